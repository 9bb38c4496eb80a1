//! Pieces of the forms. The forms outside islands are plain HTML forms posting to server
//! functions: the same with JavaScript on or off. After a post the browser lands back on the
//! page, which shows the form's error (Leptos puts it in the address) or the message the form
//! left (a [`Flash`]).

use crate::api::SignIn;
use crate::error::AppError;
use crate::views::Flash;
use leptos::prelude::*;
use leptos::server_fn::error::ServerFnUrlError;
use leptos::server_fn::ServerFn;
use leptos_meta::Title;

#[component]
pub fn Field(
    label: &'static str,
    name: &'static str,
    #[prop(default = "text")] kind: &'static str,
    #[prop(default = true)] required: bool,
    #[prop(default = "")] placeholder: &'static str,
    #[prop(optional, into)] value: String,
    #[prop(default = "")] autocomplete: &'static str,
) -> impl IntoView {
    view! {
        <label class="field">
            <span>{label}</span>
            <input type=kind name=name required=required placeholder=placeholder value=value
                step=(kind == "number").then_some("1")
                autocomplete=(!autocomplete.is_empty()).then_some(autocomplete)/>
        </label>
    }
}

/// The error the last post to server function `S` came back with, if it answers form `form`:
/// after a plain form post, Leptos sends the browser back with the error in the address.
///
/// The forms outside islands are plain `<form method="post" action=S::PATH>`: no script ever
/// runs for them, so the `ServerAction` and `ActionForm` machinery (signals, handlers) would be
/// built on every render for nothing.
pub fn failed<S: ServerFn<Error = AppError>>(form: &str) -> Option<AppError> {
    let posted = use_context::<ServerActionError>()?;
    if posted.path() != S::PATH {
        return None;
    }
    let err = ServerFnUrlError::<AppError>::decode_err(posted.err());
    err.form.as_deref().is_none_or(|f| f == form).then_some(err)
}

/// Under a form: its error, or the message it left (with its one-time secret, to copy).
#[component]
pub fn Outcome(form: &'static str, error: Option<AppError>, flash: Option<Flash>) -> impl IntoView {
    let flash = flash.filter(|f| f.form == form);
    view! {
        {error.map(|err| view! {
            <p class="form-error" role="alert" data-code=err.code.clone()>{err.message}</p>
        })}
        {flash.map(|flash| view! {
            <div class="form-ok" role="status">
                <p>{flash.text}</p>
                {flash.secret.map(|secret| view! {
                    <input class="secret" type="text" readonly value=secret aria-label="Shown once: copy it now"
                        data-testid="secret"/>
                })}
            </div>
        })}
    }
}

/// Email and password; after signing in, on to `next` (or the account's own page).
#[component]
pub fn SignInForm(#[prop(into)] title: String, #[prop(optional, into)] next: String) -> impl IntoView {
    let error = failed::<SignIn>("sign_in");
    view! {
        <section class="card auth">
            <h2>{title}</h2>
            <form method="post" action=SignIn::PATH class="form">
                <input type="hidden" name="next" value=next/>
                <Field label="Email" name="email" kind="email" autocomplete="username"/>
                <Field label="Password" name="password" kind="password" autocomplete="current-password"/>
                <button type="submit">"Sign in"</button>
            </form>
            <Outcome form="sign_in" error flash=None/>
        </section>
    }
}

/// Set the status of the page being rendered (401 to sign in, 403, 404).
pub fn set_status(status: u16) {
    #[cfg(feature = "ssr")]
    if let (Some(response), Ok(status)) =
        (use_context::<leptos_axum::ResponseOptions>(), http::StatusCode::from_u16(status))
    {
        response.set_status(status);
    }
    #[cfg(not(feature = "ssr"))]
    let _ = status;
}

/// What a page shows someone who may not see it: a sign-in form, or why not.
#[component]
pub fn NotAllowed(#[prop(into)] title: String, #[prop(into)] message: String, status: u16) -> impl IntoView {
    set_status(status);
    view! {
        <section class="card empty" role="alert">
            <h1>{title}</h1>
            <p>{message}</p>
        </section>
    }
}

/// What a page for staff (or, with `admins_only`, for admins) shows anyone else: a sign-in form
/// (401) that comes back to `path`, or why not (403). None for those the page is for.
pub fn staff_gate(path: &str, admins_only: bool) -> Option<AnyView> {
    let caller = crate::request::caller();
    if !caller.is_signed_in() {
        set_status(401);
        let title = if admins_only { "Admin sign in" } else { "Staff sign in" };
        return Some(view! { <Title text="Sign in: Tally"/> <SignInForm title next=path.to_string()/> }.into_any());
    }
    let (allowed, title, message) = if admins_only {
        (caller.is_admin(), "Admins only", "Keys and people's accounts are managed by admins.")
    } else {
        (caller.is_staff(), "Staff only", "The staff console is for the people who run the programme.")
    };
    (!allowed)
        .then(|| view! { <Title text=format!("{title}: Tally")/> <NotAllowed title message status=403/> }.into_any())
}
