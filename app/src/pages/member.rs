//! `/members/{id}`: the membership portal. The server renders the page from the view; the card is
//! an island, the only part of the page that runs in the browser: it keeps the card current from
//! the live socket and always shows the view with the highest position.
//!
//! A member sees only their own page (another member's id is "not found", exactly as an unknown
//! id is), with forms to redeem points and to change their profile. Staff see any member's page,
//! with its history and who caused each event, and the card as it was after any of those events
//! (`?at_position=P`, computed from the log: an audit).

use crate::api::{get_member, get_member_at, member_history, IssueAccessLink, RedeemReward, UpdateMyProfile};
use crate::components::forms::{failed, set_status, Field, Outcome, SignInForm};
use crate::components::membership::MembershipCard;
use crate::error::AppError;
use crate::format;
use crate::views::{Flash, HistoryEntry, MembershipView};
use leptos::prelude::*;
use leptos::server_fn::ServerFn;
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
    let caller = crate::request::caller();
    if !caller.is_signed_in() {
        set_status(401);
        return view! {
            <Title text="Sign in: Tally"/>
            <SignInForm title="Sign in to see your membership" next=format!("/members/{member_id}")/>
        }
        .into_any();
    }
    let own = caller.member_id() == Some(member_id.as_str());
    let staff = caller.is_staff();
    let flash = if own || staff { crate::request::take_flash() } else { None };
    // `?min_position=P` (from a command's answer): show at least that fresh a view.
    let min_position = use_query_map().read_untracked().get("min_position").and_then(|p| p.parse::<u64>().ok());
    // Staff: `?at_position=P` shows the card as it was then, not live.
    let at_position =
        use_query_map().read_untracked().get("at_position").and_then(|p| p.parse::<u64>().ok()).filter(|_| staff);
    let initial = Resource::new_blocking(
        {
            let member_id = member_id.clone();
            move || (member_id.clone(), min_position, at_position)
        },
        |(id, min, at)| async move {
            match at {
                Some(at) => get_member_at(id, at).await,
                None => get_member(id, min).await,
            }
        },
    );
    // Staff only: members do not see their history's actors (and the page is cheaper without).
    let history = staff.then(|| {
        let member_id = member_id.clone();
        Resource::new_blocking(move || member_id.clone(), member_history)
    });

    view! {
        <Suspense fallback=|| view! { <p class="muted">"Loading membership…"</p> }>
            {move || {
                let (member_id, flash) = (member_id.clone(), flash.clone());
                Suspend::new(async move {
                    let view = initial.await;
                    let history = match history {
                        Some(history) => Some(history.await),
                        None => None,
                    };
                    match view {
                        Err(err) => {
                            set_status(if err.code == "forbidden" { 403 } else { 500 });
                            view! {
                                <Title text="Tally: error"/>
                                <section class="card empty" role="alert">
                                    <h1>"This page could not be loaded"</h1>
                                    <p>{err.message}</p>
                                </section>
                            }.into_any()
                        }
                        Ok(None) if !staff => {
                            set_status(404);
                            view! { <Title text=page_title(None)/> <NotFoundCard member_id/> }.into_any()
                        }
                        Ok(view) => {
                            if view.is_none() {
                                set_status(404);
                            }
                            let forms = (own && view.is_some())
                                .then(|| view! { <OwnForms view=view.clone() flash=flash.clone()/> });
                            let audit = history.map(|history| view! {
                                <StaffTools member_id=member_id.clone() history flash at_position/>
                            });
                            let title = page_title(view.as_ref());
                            let card = match at_position {
                                Some(at) => view! { <PastCard member_id at view/> }.into_any(),
                                None => view! { <LiveMembership member_id initial=view/> }.into_any(),
                            };
                            view! {
                                <Title text=title/>
                                {card}
                                {forms}
                                {audit}
                            }.into_any()
                        }
                    }
                })
            }}
        </Suspense>
    }
    .into_any()
}

#[component]
fn NotFoundCard(member_id: String) -> impl IntoView {
    view! {
        <section class="card empty">
            <h1>"Member not found"</h1>
            <p>"No member has the id " <code>{member_id}</code> "."</p>
        </section>
    }
}

/// The card, live. Hydrated from its own WASM chunk (`lazy`), which only this page downloads.
/// A member not found yet is watched too (staff only): the card appears once they enroll.
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

/// Staff: the card as it was right after position `at` (static: the past does not change).
#[component]
fn PastCard(member_id: String, at: u64, view: Option<MembershipView>) -> impl IntoView {
    let live = format!("/members/{member_id}");
    view! {
        <p class="card notice" data-testid="past-card">
            "As it was after position " {format::points(at)} ", from the log. "
            <a href=live>"Back to the live card"</a>
        </p>
        {match view {
            Some(view) => view! { <MembershipCard view connected=Signal::derive(|| false)/> }.into_any(),
            None => view! {
                <section class="card empty">
                    <h1>"Not enrolled yet"</h1>
                    <p>"The member " <code>{member_id}</code> " had not enrolled by position " {format::points(at)} "."</p>
                </section>
            }.into_any(),
        }}
    }
}

/// A member's own forms: redeem points, change their profile.
#[component]
fn OwnForms(view: Option<MembershipView>, flash: Option<Flash>) -> impl IntoView {
    let (name, email) = view.map(|v| (v.name, v.email)).unwrap_or_default();
    let (redeem_error, profile_error) = (failed::<RedeemReward>("redeem"), failed::<UpdateMyProfile>("profile"));
    view! {
        <div class="member-forms">
            <section class="card action">
                <h2>"Redeem a reward"</h2>
                <form method="post" action=RedeemReward::PATH class="form">
                    <Field label="Points" name="points" kind="number"/>
                    <Field label="Reward" name="reward" required=false placeholder="Coffee mug"/>
                    <button type="submit">"Redeem"</button>
                </form>
                <Outcome form="redeem" error=redeem_error flash=flash.clone()/>
            </section>
            <section class="card action">
                <h2>"Your profile"</h2>
                <form method="post" action=UpdateMyProfile::PATH class="form">
                    <Field label="Name" name="name" value=name autocomplete="name"/>
                    <Field label="Email" name="email" kind="email" value=email autocomplete="email"/>
                    <button type="submit">"Save"</button>
                </form>
                <Outcome form="profile" error=profile_error flash/>
                <p class="small muted"><a href="/account">"Change your password"</a></p>
            </section>
        </div>
    }
}

/// Staff: an access link for this member, and the member's history with who caused each event.
#[component]
fn StaffTools(
    member_id: String,
    history: Result<Vec<HistoryEntry>, AppError>,
    flash: Option<Flash>,
    at_position: Option<u64>,
) -> impl IntoView {
    let link_error = failed::<IssueAccessLink>("access_link");
    let page = format!("/members/{member_id}");
    view! {
        <section class="card action">
            <h2>"Access link"</h2>
            <p class="muted small">"For the member to set their password: first access, or a reset. Shown once."</p>
            <form method="post" action=IssueAccessLink::PATH class="form">
                <input type="hidden" name="member_id" value=member_id/>
                <button type="submit">"Issue an access link"</button>
            </form>
            <Outcome form="access_link" error=link_error flash/>
        </section>
        <section class="card">
            <h2>"History"</h2>
            <p class="muted small">"Choose a position to see the card as it was right after that event."</p>
            {match history {
                Err(err) => view! { <p class="form-error" role="alert">{err.message}</p> }.into_any(),
                Ok(entries) => view! {
                    <div class="table-wrap">
                        <table class="history">
                            <thead><tr>
                                <th class="num">"Position"</th><th>"When"</th><th>"Event"</th><th>"By"</th><th>"Data"</th>
                            </tr></thead>
                            <tbody>
                                {entries.into_iter().rev().map(|e| view! {
                                    <tr class:selected=at_position == Some(e.position)>
                                        <td class="num">
                                            <a href=format!("{page}?at_position={}", e.position) title="The card after this event">
                                                {format::points(e.position)}
                                            </a>
                                        </td>
                                        <td>{format::when(&e.recorded_at)}</td>
                                        <td>{e.event_type}</td>
                                        <td><code class="small" data-testid="actor">{e.actor}</code></td>
                                        <td><code class="small">{e.data}</code></td>
                                    </tr>
                                }).collect_view()}
                            </tbody>
                        </table>
                    </div>
                }.into_any(),
            }}
        </section>
    }
}
