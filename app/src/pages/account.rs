//! `/account`: the signed-in person's or member's own account: change the password (every other
//! session of the account ends).

use crate::api::ChangePassword;
use crate::components::forms::{failed, set_status, Field, Outcome, SignInForm};
use leptos::prelude::*;
use leptos::server_fn::ServerFn;
use leptos_meta::Title;

#[component]
pub fn AccountPage() -> impl IntoView {
    let caller = crate::request::caller();
    if !matches!(caller, crate::domain::access::Caller::Member { .. } | crate::domain::access::Caller::Person { .. }) {
        set_status(401);
        return view! { <Title text="Sign in: Tally"/> <SignInForm title="Sign in" next="/account"/> }.into_any();
    }
    let flash = crate::request::take_flash();
    let error = failed::<ChangePassword>("password");
    view! {
        <Title text="Your account: Tally"/>
        <section class="card auth narrow">
            <h1>"Your account"</h1>
            <h2>"Change your password"</h2>
            <form method="post" action=ChangePassword::PATH class="form">
                <Field label="Current password" name="current_password" kind="password" autocomplete="current-password"/>
                <Field label="New password (at least 10 characters)" name="new_password" kind="password"
                    autocomplete="new-password"/>
                <button type="submit">"Change password"</button>
            </form>
            <Outcome form="password" error flash/>
        </section>
    }
    .into_any()
}
