//! Tally's Leptos app: compiled with `ssr` into the server and with `hydrate` to WASM.

pub mod api;
mod components;
pub mod domain;
pub mod error;
pub mod format;
#[cfg(feature = "hydrate")]
mod live;
mod pages;
pub mod views;

use leptos::prelude::*;
use leptos_meta::{provide_meta_context, MetaTags, Stylesheet, Title};
use leptos_router::components::{Route, Router, Routes, A};
use leptos_router::{path, SsrMode};

/// The HTML document around the app (server side only renders it).
pub fn shell(options: LeptosOptions) -> impl IntoView {
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
            <header class="topbar">
                <A href="/" attr:class="brand">"Tally"</A>
                <nav>
                    <A href="/admin">"Staff console"</A>
                </nav>
            </header>
            <main class="container">
                <Routes fallback=|| view! { <pages::not_found::NotFound/> }>
                    <Route path=path!("/") view=pages::home::HomePage/>
                    // Async: the server sends each page complete, so it reads and works without
                    // JavaScript (streamed chunks would need a script to swap in).
                    <Route path=path!("/members/:id") view=pages::member::MemberPage ssr=SsrMode::Async/>
                    <Route path=path!("/admin") view=pages::admin::AdminPage ssr=SsrMode::Async/>
                </Routes>
            </main>
            <footer class="footer">"Tally: live, event-sourced membership views"</footer>
        </Router>
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
