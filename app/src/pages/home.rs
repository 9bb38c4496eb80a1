//! `/`: sign in, or join. Someone signed in goes on to their own page.

use crate::api::Join;
use crate::components::forms::{failed, Field, Outcome, SignInForm};
use leptos::prelude::*;
use leptos::server_fn::ServerFn;
use leptos_meta::Title;

#[component]
pub fn HomePage() -> impl IntoView {
    #[cfg(feature = "ssr")]
    {
        use crate::domain::access::Caller;
        match crate::request::caller() {
            Caller::Member { member_id, .. } => leptos_axum::redirect(&format!("/members/{member_id}")),
            Caller::Person { .. } => leptos_axum::redirect("/admin"),
            Caller::Key { .. } | Caller::Anonymous => {}
        }
    }
    let join_error = failed::<Join>("join");
    view! {
        <Title text="Tally"/>
        <section class="hero">
            <h1>"Your membership, live."</h1>
            <p class="lead">
                "Tally keeps one ready-made view of every membership and pushes each change to the page "
                "the moment it happens."
            </p>
        </section>
        <div class="auth-grid">
            <SignInForm title="Sign in"/>
            <section class="card auth">
                <h2>"Join"</h2>
                <form method="post" action=Join::PATH class="form">
                    <Field label="Your name" name="name" autocomplete="name"/>
                    <Field label="Email" name="email" kind="email" autocomplete="email"/>
                    <Field label="Password (at least 10 characters)" name="password" kind="password"
                        autocomplete="new-password"/>
                    <button type="submit">"Join"</button>
                </form>
                <Outcome form="join" error=join_error flash=None/>
            </section>
        </div>
    }
}
