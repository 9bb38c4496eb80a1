//! Security headers on every response (docs/security.md).
//!
//! Pages set their own Content-Security-Policy, with the nonce their scripts carry (see the
//! app's `shell`); every other response gets one that allows nothing, which is what a JSON
//! answer or a file needs. No response may be framed by another site.

use axum::http::{header, HeaderName, HeaderValue};
use axum::Router;
use tower_http::set_header::SetResponseHeaderLayer;

/// What a response that is not a page may do: nothing, and not be framed.
const DEFAULT_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// `router` with the headers; with `https`, HSTS too (a browser then never tries plain HTTP for
/// a year).
pub fn add<S: Clone + Send + Sync + 'static>(router: Router<S>, https: bool) -> Router<S> {
    let set = |name: HeaderName, value: &'static str| {
        SetResponseHeaderLayer::if_not_present(name, HeaderValue::from_static(value))
    };
    let router = router
        .layer(set(header::CONTENT_SECURITY_POLICY, DEFAULT_CSP))
        .layer(set(header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .layer(set(header::X_FRAME_OPTIONS, "DENY"))
        // Same-origin requests keep their referrer (a form posted without JavaScript is sent
        // back to the page it came from); nothing leaves for other sites, access links included.
        .layer(set(header::REFERRER_POLICY, "same-origin"));
    if https {
        router.layer(set(header::STRICT_TRANSPORT_SECURITY, "max-age=31536000"))
    } else {
        router
    }
}
