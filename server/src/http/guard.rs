//! Who is asking, for every request: one middleware resolves the caller (a bearer key or a
//! session cookie, from memory) and applies the origin rule; handlers take the caller with the
//! [`Authed`] extractor and ask `access::authorize` what it may do.

use super::error::ApiError;
use crate::auth::sessions::{SessionAuth, AUTH_KEY};
use crate::auth::Auth;
use crate::AppState;
use app::domain::access::{authorize, Action, Caller};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::{Arc, LazyLock};
use tower_sessions::Session;

static ANONYMOUS: LazyLock<Arc<Caller>> = LazyLock::new(|| Arc::new(Caller::Anonymous));

/// Resolve the caller, refuse cross-site changes, and hand the caller on as a request
/// extension (`Arc<Caller>`: server functions read it there too).
pub async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let (caller, cookie) = match resolve(&state.auth, request.headers(), request.extensions().get::<Session>()).await {
        Ok(resolved) => resolved,
        Err(err) => return err.into_response(),
    };
    if let Err(err) = check_origin(&state.auth, &request, cookie) {
        return err.into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// The caller, and whether it came with a session cookie (the origin rule is for those).
async fn resolve(auth: &Auth, headers: &HeaderMap, session: Option<&Session>) -> Result<(Arc<Caller>, bool), ApiError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        // Anything but a live key's token is no one: routes that need someone say 401.
        let token = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
        let caller = match token {
            Some(token) => auth.keys.caller(token).await?,
            None => None,
        };
        return Ok((caller.unwrap_or_else(|| ANONYMOUS.clone()), false));
    }
    let Some(session) = session.filter(|s| s.id().is_some()) else { return Ok((ANONYMOUS.clone(), false)) };
    let signed_in = session.get::<SessionAuth>(AUTH_KEY).await.map_err(ApiError::internal)?;
    let Some(mut signed_in) = signed_in else { return Ok((ANONYMOUS.clone(), true)) };
    let caller = auth.accounts.caller(&signed_in.account).await?;
    // Used: keep the session alive (saved, and its cookie renewed, about once a minute).
    let now = time::OffsetDateTime::now_utc();
    if caller.is_some() && signed_in.stale(now) {
        signed_in.touched = now.unix_timestamp();
        session.insert(AUTH_KEY, signed_in).await.map_err(ApiError::internal)?;
    }
    Ok((caller.unwrap_or_else(|| ANONYMOUS.clone()), true))
}

/// API.md: a cookie-authenticated request that changes anything (any method but GET, HEAD,
/// OPTIONS; and the `/ws` upgrade) must come from this server's own origin: its `Origin` names
/// it, or it has no `Origin` and says `Sec-Fetch-Site: same-origin`. Requests with a bearer key
/// are exempt (a page on another site cannot make a browser send one). A request without a
/// session (sign-in, sign-up) that a browser marks as coming from another site is refused too, so
/// no other site can sign a visitor in to an account of its choosing.
fn check_origin(auth: &Auth, request: &Request, cookie: bool) -> Result<(), ApiError> {
    let headers = request.headers();
    if headers.contains_key(header::AUTHORIZATION) {
        return Ok(());
    }
    let changes =
        !matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS) || request.uri().path() == "/ws";
    if !changes {
        return Ok(());
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    let ours = || own_origin(auth, headers);
    let same = match origin {
        Some(origin) => ours().is_some_and(|ours| origin.eq_ignore_ascii_case(&ours)),
        None => fetch_site == Some("same-origin"),
    };
    let refused = if cookie {
        !same
    } else {
        // Without a session, only what a browser says came from elsewhere.
        (origin.is_some() && !same) || matches!(fetch_site, Some("cross-site" | "same-site"))
    };
    if refused {
        return Err(ApiError::CrossOrigin);
    }
    Ok(())
}

/// The configured public URL's origin, else the request's `Host` over plain HTTP (Tally itself
/// serves HTTP; behind a TLS proxy, configure the public URL).
fn own_origin(auth: &Auth, headers: &HeaderMap) -> Option<String> {
    if let Some(origin) = &auth.config.public_origin {
        return Some(origin.clone());
    }
    let host = headers.get(header::HOST)?.to_str().ok()?;
    Some(format!("http://{host}"))
}

/// A signed-in caller (a member, a person or a key); 401 `unauthenticated` for anyone else.
pub struct Authed(pub Arc<Caller>);

impl Authed {
    /// `access::authorize`, as an API error (a member's `NotFound` names the member).
    pub fn may(&self, action: Action) -> Result<(), ApiError> {
        let member_id = match action {
            Action::ReadMember(id) | Action::UpdateProfile(id) | Action::Redeem(id) => id,
            _ => "",
        };
        authorize(&self.0, action).map_err(|denied| ApiError::denied(denied, member_id))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        match parts.extensions.get::<Arc<Caller>>() {
            Some(caller) if caller.is_signed_in() => Ok(Authed(caller.clone())),
            _ => Err(ApiError::Unauthenticated),
        }
    }
}

/// The caller whoever it is (anonymous included), for routes anyone may use.
pub fn caller_of(parts: &Parts) -> Arc<Caller> {
    parts.extensions.get::<Arc<Caller>>().cloned().unwrap_or_else(|| ANONYMOUS.clone())
}
