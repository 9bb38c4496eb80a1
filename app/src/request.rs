//! What the server knows about the request a page or a server function answers: who is asking
//! (resolved by the server for every request, from a session cookie or a key) and a one-time
//! message left by the form posted just before.
//!
//! Server side only: in the browser these answer "no one" and "nothing" (the pages that ask are
//! rendered on the server; only islands run in the browser, and they get what they need as
//! props).

use crate::domain::access::Caller;
use crate::views::Flash;

/// The cookie that carries a [`Flash`] across the redirect after a form post.
pub const FLASH_COOKIE: &str = "tally_flash";

/// Who is asking.
pub fn caller() -> Caller {
    #[cfg(feature = "ssr")]
    {
        use leptos::prelude::use_context;
        let parts = use_context::<http::request::Parts>();
        if let Some(caller) = parts.and_then(|p| p.extensions.get::<std::sync::Arc<Caller>>().cloned()) {
            return (*caller).clone();
        }
    }
    Caller::Anonymous
}

/// The message the previous form left, if any; taken (its cookie is cleared with this answer).
pub fn take_flash() -> Option<Flash> {
    #[cfg(feature = "ssr")]
    {
        take_flash_cookie()
    }
    #[cfg(not(feature = "ssr"))]
    None
}

#[cfg(feature = "ssr")]
fn take_flash_cookie() -> Option<Flash> {
    use base64::Engine;
    use leptos::prelude::use_context;
    let parts = use_context::<http::request::Parts>()?;
    let value = parts
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(FLASH_COOKIE)?.strip_prefix('='))?
        .to_string();
    if let Some(response) = use_context::<leptos_axum::ResponseOptions>() {
        let clear = format!("{FLASH_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict");
        if let Ok(clear) = http::HeaderValue::from_str(&clear) {
            response.append_header(http::header::SET_COOKIE, clear);
        }
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(value).ok()?;
    serde_json::from_slice(&json).ok()
}

/// Leave `flash` for the page the browser is sent back to (a plain form post; with JavaScript
/// the form shows the answer itself). Kept a minute at most, readable by no script, sent to this
/// site only.
#[cfg(feature = "ssr")]
pub fn set_flash(flash: &Flash, secure: bool) {
    use base64::Engine;
    use leptos::prelude::use_context;
    let Some(response) = use_context::<leptos_axum::ResponseOptions>() else { return };
    let Ok(json) = serde_json::to_vec(flash) else { return };
    let value = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
    let secure = if secure { "; Secure" } else { "" };
    let cookie = format!("{FLASH_COOKIE}={value}; Path=/; Max-Age=60; HttpOnly; SameSite=Strict{secure}");
    if let Ok(cookie) = http::HeaderValue::from_str(&cookie) {
        response.append_header(http::header::SET_COOKIE, cookie);
    }
}
