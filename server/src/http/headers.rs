//! Security headers on every response (docs/security.md).
//!
//! A page gets a Content-Security-Policy with a nonce made here for it ([`page_csp`]), which its
//! scripts carry (the app's `shell` reads it from the request); every other response gets one
//! that allows nothing, which is what a JSON answer or a file needs. No response may be framed
//! by another site.

use axum::http::{header, HeaderName, HeaderValue};
use axum::Router;
use tower_http::set_header::SetResponseHeaderLayer;

/// What a response that is not a page may do: nothing, and not be framed.
const DEFAULT_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// Around the pages: a fresh nonce for the request (`app::PageNonce`), and on an HTML answer the
/// page CSP allowing only scripts that carry it. Set here rather than by the page as it renders:
/// a header set through Leptos' response options was at times missing from the answer (a page
/// loaded right after another then ran no script at all).
pub async fn page_csp(mut request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let nonce = leptos::nonce::Nonce::new().to_string();
    request.extensions_mut().insert(app::PageNonce(nonce.clone()));
    let mut response = next.run(request).await;
    let html = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if html {
        if let Ok(csp) = HeaderValue::from_str(&app::page_csp(&nonce)) {
            response.headers_mut().insert(header::CONTENT_SECURITY_POLICY, csp);
        }
    }
    response
}

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
