//! `/members/{id}`: the membership portal. Server-rendered from the view, then kept current by
//! the live socket (hydrate only): the page always shows the view with the highest position.

use crate::api::get_member;
use crate::components::membership::MembershipCard;
use crate::views::MembershipView;
use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::hooks::{use_params_map, use_query_map};
use leptos_router::{lazy_route, LazyRoute};

/// The route: its view (this page, the card, the live socket) is a lazily loaded WASM chunk.
pub struct MemberRoute;

#[lazy_route]
impl LazyRoute for MemberRoute {
    fn data() -> Self {
        MemberRoute
    }

    fn view(_this: Self) -> AnyView {
        view! { <MemberPage/> }.into_any()
    }
}

/// Keep whichever view is newer: the one rendered with the page or the latest pushed one.
fn newest(rendered: Option<MembershipView>, pushed: Option<MembershipView>) -> Option<MembershipView> {
    match (rendered, pushed) {
        (Some(a), Some(b)) => Some(if b.position > a.position { b } else { a }),
        (a, b) => a.or(b),
    }
}

#[component]
pub fn MemberPage() -> impl IntoView {
    let params = use_params_map();
    let member_id = Memo::new(move |_| params.read().get("id").unwrap_or_default());
    // `?min_position=P` (from a command's answer): show at least that fresh a view.
    let query = use_query_map();
    let min_position = Memo::new(move |_| query.read().get("min_position").and_then(|p| p.parse::<u64>().ok()));
    let initial =
        Resource::new_blocking(move || (member_id.get(), min_position.get()), |(id, min)| get_member(id, min));
    let pushed: RwSignal<Option<MembershipView>> = RwSignal::new(None);
    let connected = RwSignal::new(false);

    #[cfg(feature = "hydrate")]
    Effect::new(move |_| {
        let id = member_id.get();
        pushed.set(None);
        crate::live::watch_member(id, pushed, connected);
    });
    #[cfg(feature = "hydrate")]
    on_cleanup(crate::live::stop);

    view! {
        <Suspense fallback=|| view! { <p class="muted">"Loading membership…"</p> }>
            {move || Suspend::new(async move {
                let rendered = initial.await;
                view! {
                    {move || {
                        let id = member_id.get();
                        match rendered.clone() {
                            Err(err) => view! {
                                <Title text="Tally: error"/>
                                <section class="card empty" role="alert">
                                    <h1>"This page could not be loaded"</h1>
                                    <p>{err.message}</p>
                                </section>
                            }.into_any(),
                            Ok(view) => match newest(view, pushed.get()) {
                                Some(view) => view! {
                                    <Title text=format!("{}: Tally", view.name)/>
                                    <MembershipCard view connected=connected.into()/>
                                }.into_any(),
                                None => view! {
                                    <Title text="Tally: member not found"/>
                                    <section class="card empty">
                                        <h1>"Member not found"</h1>
                                        <p>"No member has the id " <code>{id}</code> "."</p>
                                    </section>
                                }.into_any(),
                            },
                        }
                    }}
                }
            })}
        </Suspense>
    }
}
