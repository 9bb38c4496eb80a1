//! Tally's Leptos app: compiled with `ssr` into the server and with `hydrate` to WASM.

pub mod api;
mod components;
pub mod domain;
pub mod error;
pub mod format;
#[cfg(feature = "hydrate")]
mod live;
mod pages;
pub mod request;
pub mod views;

use leptos::prelude::*;
use leptos_meta::{provide_meta_context, MetaTags, Stylesheet, Title};
use leptos_router::components::{Route, Router, Routes, A};
use leptos_router::{path, SsrMode};

/// The Content-Security-Policy of a page: scripts only from this site and only those carrying the
/// page's nonce (the hydration script; the islands' WASM it loads needs `wasm-unsafe-eval`),
/// styles only from the stylesheet, sockets and fetches only to this site, forms only posting
/// here, and no framing by anyone.
pub fn page_csp(nonce: &str) -> String {
    // `cargo leptos watch` reloads the page from a socket on its own port.
    let reload = if cfg!(feature = "ssr") && std::env::var("LEPTOS_WATCH").is_ok() { " ws:" } else { "" };
    format!(
        "default-src 'self'; script-src 'self' 'nonce-{nonce}' 'wasm-unsafe-eval'; style-src 'self'; \
         img-src 'self' data:; connect-src 'self'{reload}; object-src 'none'; base-uri 'none'; \
         form-action 'self'; frame-ancestors 'none'"
    )
}

/// The nonce of the page being answered, made by the server before the page renders (a request
/// extension): the server sets the page's CSP header from it, and the page's scripts carry it.
#[cfg(feature = "ssr")]
#[derive(Debug, Clone)]
pub struct PageNonce(pub String);

/// The HTML document around the app (server side only renders it).
pub fn shell(options: LeptosOptions) -> impl IntoView {
    // The scripts carry the nonce the server put in the page's CSP header (see `PageNonce`).
    #[cfg(feature = "ssr")]
    if let Some(nonce) = use_context::<http::request::Parts>().and_then(|p| p.extensions.get::<PageNonce>().cloned()) {
        provide_context(leptos::nonce::Nonce::from_value(nonce.0));
    }
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8"/>
                <meta name="viewport" content="width=device-width, initial-scale=1"/>
                <link rel="icon" href="/favicon.ico"/>
                <AutoReload options=options.clone()/>
                <HydrationScripts options islands=true/>
                <MetaTags/>
            </head>
            <body>
                <App/>
            </body>
        </html>
    }
}

#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    view! {
        <Stylesheet id="leptos" href="/pkg/tally.css"/>
        <Title text="Tally"/>
        <Router>
            <TopBar/>
            <main class="container">
                // Async: the server sends each page complete, so it reads and works without
                // JavaScript (streamed chunks would need a script to swap in).
                <Routes fallback=|| view! { <pages::not_found::NotFound/> }>
                    <Route path=path!("/") view=pages::home::HomePage ssr=SsrMode::Async/>
                    <Route path=path!("/members/:id") view=pages::member::MemberPage ssr=SsrMode::Async/>
                    <Route path=path!("/admin") view=pages::admin::AdminPage ssr=SsrMode::Async/>
                    <Route path=path!("/admin/keys") view=pages::keys::KeysPage ssr=SsrMode::Async/>
                    <Route path=path!("/admin/people") view=pages::people::PeoplePage ssr=SsrMode::Async/>
                    <Route path=path!("/admin/operations") view=pages::operations::OperationsPage ssr=SsrMode::Async/>
                    <Route path=path!("/claim/:token") view=pages::claim::ClaimPage ssr=SsrMode::Async/>
                    <Route path=path!("/account") view=pages::account::AccountPage ssr=SsrMode::Async/>
                </Routes>
            </main>
            <footer class="footer">"Tally: live, event-sourced membership views"</footer>
        </Router>
    }
}

/// Who is signed in, where they can go, and a way out (a plain form: it works without
/// JavaScript). Server-rendered only.
#[component]
fn TopBar() -> impl IntoView {
    use crate::domain::access::Caller;
    let caller = request::caller();
    let links = match &caller {
        Caller::Member { member_id, .. } => vec![(format!("/members/{member_id}"), "My membership")],
        Caller::Person { .. } if caller.is_admin() => vec![
            ("/admin".to_string(), "Staff console"),
            ("/admin/operations".to_string(), "Operations"),
            ("/admin/keys".to_string(), "Keys"),
            ("/admin/people".to_string(), "People"),
        ],
        Caller::Person { .. } => {
            vec![("/admin".to_string(), "Staff console"), ("/admin/operations".to_string(), "Operations")]
        }
        Caller::Key { .. } | Caller::Anonymous => Vec::new(),
    };
    let sign_out = <api::SignOut as leptos::server_fn::ServerFn>::PATH;
    let who = match &caller {
        Caller::Person { name, role, .. } => Some(format!("{name} ({})", role.as_str())),
        Caller::Member { member_id, .. } => Some(format!("member {member_id}")),
        Caller::Key { name, .. } => Some(format!("key {name}")),
        Caller::Anonymous => None,
    };
    view! {
        <header class="topbar">
            <A href="/" attr:class="brand">"Tally"</A>
            <nav>
                {links.into_iter().map(|(href, label)| view! { <A href=href>{label}</A> }).collect_view()}
                {match who {
                    Some(who) => view! {
                        <A href="/account">"Account"</A>
                        <span class="whoami muted small" data-testid="signed-in-as">{who}</span>
                        <form method="post" action=sign_out class="inline">
                            <button type="submit" class="secondary small">"Sign out"</button>
                        </form>
                    }.into_any(),
                    None => view! { <A href="/">"Sign in"</A> }.into_any(),
                }}
            </nav>
        </header>
    }
}

#[cfg(feature = "hydrate")]
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    // Islands: the pages are plain server-rendered HTML; only the `#[island]` components (the live
    // membership card, the staff console) hydrate, each from its own lazily loaded WASM chunk.
    leptos::mount::hydrate_islands();
}
