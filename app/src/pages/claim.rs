//! `/claim/<token>`: an access link. Opening it changes nothing (mail scanners open links too);
//! setting the password uses it up, and signs in.

use crate::api::{claim_usable, ClaimLink};
use crate::components::forms::{failed, set_status, Field, Outcome};
use leptos::prelude::*;
use leptos::server_fn::ServerFn;
use leptos_meta::Title;
use leptos_router::hooks::use_params_map;

#[component]
pub fn ClaimPage() -> impl IntoView {
    let token = use_params_map().read_untracked().get("token").unwrap_or_default();
    let usable = Resource::new_blocking(
        {
            let token = token.clone();
            move || token.clone()
        },
        claim_usable,
    );
    let error = failed::<ClaimLink>("claim");
    view! {
        <Title text="Set your password: Tally"/>
        <Suspense fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || {
                let (token, error) = (token.clone(), error.clone());
                Suspend::new(async move {
                    match usable.await {
                        Ok(true) => view! {
                            <section class="card auth narrow">
                                <h1>"Set your password"</h1>
                                <p class="muted">"This link works once. Choose a password of at least 10 characters."</p>
                                <form method="post" action=ClaimLink::PATH class="form">
                                    <input type="hidden" name="token" value=token/>
                                    <Field label="New password" name="password" kind="password" autocomplete="new-password"/>
                                    <button type="submit">"Set password and sign in"</button>
                                </form>
                                <Outcome form="claim" error flash=None/>
                            </section>
                        }.into_any(),
                        _ => {
                            set_status(404);
                            view! {
                                <section class="card empty" role="alert">
                                    <h1>"This link cannot be used"</h1>
                                    <p>"It was used already, it has expired (links last 24 hours), or it was never issued. Ask for a new one."</p>
                                </section>
                            }.into_any()
                        }
                    }
                })
            }}
        </Suspense>
    }
}
