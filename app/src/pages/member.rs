//! `/members/{id}`: the membership portal. The server renders the page from the view; the card is
//! an island, the only part of the page that runs in the browser: it keeps the card current from
//! the live socket and always shows the view with the highest position.

use crate::api::get_member;
use crate::components::membership::MembershipCard;
use crate::views::MembershipView;
use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::hooks::{use_params_map, use_query_map};

/// Keep whichever view is newer: the one rendered with the page or the latest pushed one.
fn newest(rendered: Option<MembershipView>, pushed: Option<MembershipView>) -> Option<MembershipView> {
    match (rendered, pushed) {
        (Some(a), Some(b)) => Some(if b.position > a.position { b } else { a }),
        (a, b) => a.or(b),
    }
}

fn page_title(view: Option<&MembershipView>) -> String {
    match view {
        Some(view) => format!("{}: Tally", view.name),
        None => "Tally: member not found".to_string(),
    }
}

/// Server-rendered only: every visit is a full page load, so the id and the query are read once.
#[component]
pub fn MemberPage() -> impl IntoView {
    let member_id = use_params_map().read_untracked().get("id").unwrap_or_default();
    // `?min_position=P` (from a command's answer): show at least that fresh a view.
    let min_position = use_query_map().read_untracked().get("min_position").and_then(|p| p.parse::<u64>().ok());
    let initial = Resource::new_blocking(
        {
            let member_id = member_id.clone();
            move || (member_id.clone(), min_position)
        },
        |(id, min)| get_member(id, min),
    );

    view! {
        <Suspense fallback=|| view! { <p class="muted">"Loading membership…"</p> }>
            {move || {
                let member_id = member_id.clone();
                Suspend::new(async move {
                    match initial.await {
                        Err(err) => view! {
                            <Title text="Tally: error"/>
                            <section class="card empty" role="alert">
                                <h1>"This page could not be loaded"</h1>
                                <p>{err.message}</p>
                            </section>
                        }.into_any(),
                        Ok(view) => view! {
                            <Title text=page_title(view.as_ref())/>
                            <LiveMembership member_id initial=view/>
                        }.into_any(),
                    }
                })
            }}
        </Suspense>
    }
}

/// The card, live. Hydrated from its own WASM chunk (`lazy`), which only this page downloads.
/// A member not found yet is watched too: the card appears once they enroll.
#[island(lazy)]
fn LiveMembership(member_id: String, initial: Option<MembershipView>) -> impl IntoView {
    let pushed: RwSignal<Option<MembershipView>> = RwSignal::new(None);
    let connected = RwSignal::new(false);

    #[cfg(feature = "hydrate")]
    {
        crate::live::watch_member(member_id.clone(), pushed, connected);
        on_cleanup(crate::live::stop);
        // The page's title follows the name (a profile update); the rest of the page is static.
        Effect::new(move |_| {
            if let Some(view) = pushed.get() {
                document().set_title(&page_title(Some(&view)));
            }
        });
    }

    move || match newest(initial.clone(), pushed.get()) {
        Some(view) => view! { <MembershipCard view connected=connected.into()/> }.into_any(),
        None => view! {
            <section class="card empty">
                <h1>"Member not found"</h1>
                <p>"No member has the id " <code>{member_id.clone()}</code> "."</p>
            </section>
        }
        .into_any(),
    }
}
