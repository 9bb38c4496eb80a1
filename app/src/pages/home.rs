use leptos::prelude::*;
use leptos_meta::Title;

#[component]
pub fn HomePage() -> impl IntoView {
    view! {
        <Title text="Tally"/>
        <section class="hero">
            <h1>"Your membership, live."</h1>
            <p class="lead">
                "Tally keeps one ready-made view of every membership and pushes each change to the page "
                "the moment it happens."
            </p>
            <div class="hero-actions">
                <a class="button" href="/admin">"Open the staff console"</a>
                <a class="button secondary" href="/members/ada">"See a demo member"</a>
            </div>
        </section>
    }
}
