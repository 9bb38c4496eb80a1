//! Server functions for identity: join, sign in and out, access links, passwords, and the admin
//! pages' keys and people. Every form that posts here is a plain HTML form (they work the same
//! with JavaScript off): the answer is a redirect, with a one-time message ([`Flash`]) for the
//! page it lands on, or the error in the address (Leptos's way) for the form to show.

use crate::error::AppError;
#[cfg(feature = "ssr")]
use crate::views::Flash;
use crate::views::{AccessLink, KeySummary, PersonSummary, SignedIn};
use leptos::prelude::*;

#[cfg(feature = "ssr")]
fn identity() -> Result<std::sync::Arc<dyn super::Identity>, AppError> {
    use_context::<std::sync::Arc<dyn super::Identity>>()
        .ok_or_else(|| AppError::new("internal", "the server is not wired up (no Identity in context)"))
}

#[cfg(feature = "ssr")]
fn request() -> Result<http::request::Parts, AppError> {
    use_context::<http::request::Parts>().ok_or_else(|| AppError::new("internal", "no request in context"))
}

/// Leave a message (and maybe a secret, shown once) for the page the browser goes back to.
#[cfg(feature = "ssr")]
pub(crate) fn flash(form: &str, text: String, secret: Option<String>) {
    let secure = super::portal().map(|p| p.secure_cookies()).unwrap_or(true);
    crate::request::set_flash(&Flash { form: form.to_string(), text, secret }, secure);
}

#[cfg(feature = "ssr")]
pub(crate) fn flash_done(form: &str, text: String) {
    flash(form, text, None);
}

/// Send the browser on to `path` after the form (a local path only: never another site).
#[cfg(feature = "ssr")]
fn go_to(path: &str) {
    let local = path.starts_with('/') && !path.starts_with("//") && !path.contains('\\');
    leptos_axum::redirect(if local { path } else { "/" });
}

/// Back to the member's page after a change, at least as fresh as the change (read-your-writes:
/// without JavaScript nothing would update the page later).
#[cfg(feature = "ssr")]
pub(crate) fn back_to_member(ack: &crate::views::CommandAck) {
    if let Some(member_id) = &ack.member_id {
        go_to(&format!("/members/{member_id}?min_position={}", ack.position));
    }
}

/// Sign in; then on to `next` (the page that asked for it) or the account's own page.
#[server(prefix = "/_fn")]
pub async fn sign_in(email: String, password: String, next: Option<String>) -> Result<SignedIn, AppError> {
    let run = async {
        let signed_in = identity()?.sign_in(&request()?, &email, &password).await?;
        go_to(next.as_deref().filter(|n| !n.is_empty()).unwrap_or(&signed_in.home()));
        Ok(signed_in)
    };
    run.await.map_err(|err: AppError| err.on_form("sign_in"))
}

#[server(prefix = "/_fn")]
pub async fn sign_out() -> Result<(), AppError> {
    let run = async {
        identity()?.sign_out(&request()?).await?;
        go_to("/");
        Ok(())
    };
    run.await.map_err(|err: AppError| err.on_form("sign_out"))
}

/// A member joins: enrolled, signed in, and on their own page.
#[server(prefix = "/_fn")]
pub async fn join(name: String, email: String, password: String) -> Result<SignedIn, AppError> {
    let run = async {
        let signed_in = identity()?.join(&request()?, &name, &email, &password).await?;
        go_to(&signed_in.home());
        Ok(signed_in)
    };
    run.await.map_err(|err: AppError| err.on_form("join"))
}

/// Whether the access link `token` can still be used (the claim page asks before its form).
#[server(prefix = "/_fn")]
pub async fn claim_usable(token: String) -> Result<bool, AppError> {
    identity()?.link_usable(&token).await.map_err(AppError::answered)
}

/// Use an access link: set the password, sign in, go to the account's page.
#[server(prefix = "/_fn")]
pub async fn claim_link(token: String, password: String) -> Result<SignedIn, AppError> {
    let run = async {
        let signed_in = identity()?.claim(&request()?, &token, &password).await?;
        go_to(&signed_in.home());
        Ok(signed_in)
    };
    run.await.map_err(|err: AppError| err.on_form("claim"))
}

/// Change the signed-in account's password; its other sessions end.
#[server(prefix = "/_fn")]
pub async fn change_password(current_password: String, new_password: String) -> Result<(), AppError> {
    let run = async {
        let caller = crate::request::caller();
        if !caller.is_signed_in() {
            return Err(AppError::unauthenticated());
        }
        identity()?.change_password(&request()?, &caller, &current_password, &new_password).await?;
        flash_done("password", "Your password is changed; you were signed out everywhere else.".into());
        Ok(())
    };
    run.await.map_err(|err: AppError| err.on_form("password"))
}

/// Staff: a link for a member to set their password (first access, or a reset). Shown once.
#[server(prefix = "/_fn")]
pub async fn issue_access_link(member_id: String) -> Result<AccessLink, AppError> {
    let run = async {
        super::authorized(crate::domain::access::Action::ManageMembers)?;
        let caller = crate::request::caller();
        let link = identity()?.member_link(&caller, member_id.trim()).await?;
        let text = format!("Access link for {}, valid once until {}:", member_id.trim(), link.expires_at);
        flash("access_link", text, Some(link.url.clone()));
        Ok(link)
    };
    run.await.map_err(|err: AppError| err.on_form("access_link"))
}

#[server(prefix = "/_fn")]
pub async fn list_keys() -> Result<Vec<KeySummary>, AppError> {
    super::authorized(crate::domain::access::Action::Administer)?;
    identity()?.keys(&crate::request::caller()).await.map_err(AppError::answered)
}

/// Admin: a new key; its token is shown once, on the page the form goes back to.
#[server(prefix = "/_fn")]
pub async fn create_key(name: String, role: String) -> Result<KeySummary, AppError> {
    let run = async {
        super::authorized(crate::domain::access::Action::Administer)?;
        let (key, token) = identity()?.create_key(&crate::request::caller(), &name, &role).await?;
        let text =
            format!("Key {} ({}, {}) created. Copy its token now: it is not shown again.", key.id, key.name, key.role);
        flash("create_key", text, Some(token));
        Ok(key)
    };
    run.await.map_err(|err: AppError| err.on_form("create_key"))
}

#[server(prefix = "/_fn")]
pub async fn revoke_key(id: String) -> Result<(), AppError> {
    let run = async {
        super::authorized(crate::domain::access::Action::Administer)?;
        identity()?.revoke_key(&crate::request::caller(), &id).await?;
        flash_done("keys", format!("Key {id} revoked."));
        Ok(())
    };
    run.await.map_err(|err: AppError| err.on_form("keys"))
}

#[server(prefix = "/_fn")]
pub async fn list_people() -> Result<Vec<PersonSummary>, AppError> {
    super::authorized(crate::domain::access::Action::Administer)?;
    identity()?.people(&crate::request::caller()).await.map_err(AppError::answered)
}

/// Admin: a person's account; the link to set its password is shown once.
#[server(prefix = "/_fn")]
pub async fn create_person(email: String, name: String, role: String) -> Result<PersonSummary, AppError> {
    let run = async {
        super::authorized(crate::domain::access::Action::Administer)?;
        let (person, link) = identity()?.create_person(&crate::request::caller(), &email, &name, &role).await?;
        let text = format!(
            "{} ({}) can now set a password with this link, valid once until {}:",
            person.email, person.role, link.expires_at
        );
        flash("create_person", text, Some(link.url));
        Ok(person)
    };
    run.await.map_err(|err: AppError| err.on_form("create_person"))
}

/// Admin: `change` a person's account: `staff` or `admin` (role), `disable`, `enable`, or `link`
/// (a password reset link, shown once).
#[server(prefix = "/_fn")]
pub async fn change_person(id: String, change: String) -> Result<(), AppError> {
    let run = async {
        super::authorized(crate::domain::access::Action::Administer)?;
        let (identity, caller) = (identity()?, crate::request::caller());
        match change.as_str() {
            "staff" | "admin" => identity.update_person(&caller, &id, Some(&change), None).await?,
            "disable" => identity.update_person(&caller, &id, None, Some(true)).await?,
            "enable" => identity.update_person(&caller, &id, None, Some(false)).await?,
            "link" => {
                let link = identity.person_link(&caller, &id).await?;
                flash("people", format!("Password reset link, valid once until {}:", link.expires_at), Some(link.url));
                return Ok(());
            }
            other => return Err(AppError::invalid(format!("unknown change '{other}'"))),
        }
        flash_done("people", format!("Account {id}: {change} done; its sessions have ended."));
        Ok(())
    };
    run.await.map_err(|err: AppError| err.on_form("people"))
}
