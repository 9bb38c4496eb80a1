use leptos::prelude::*;

#[component]
pub fn NotFound() -> impl IntoView {
    #[cfg(feature = "ssr")]
    {
        if let Some(resp) = use_context::<leptos_axum::ResponseOptions>() {
            resp.set_status(http::StatusCode::NOT_FOUND);
        }
    }
    view! {
        <section class="card empty">
            <h1>"Page not found"</h1>
            <p>"There is nothing at this address. Try the " <a href="/admin">"staff console"</a> "."</p>
        </section>
    }
}
