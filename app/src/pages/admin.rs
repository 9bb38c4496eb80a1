//! `/admin`: the staff console. Member search, the actions (each an `ActionForm`, so it works
//! without JavaScript too), access links for members, and the consumers' status. The console is
//! one island: it hydrates from its own WASM chunk, which visitors of the other pages never
//! download. Staff only: anyone else is asked to sign in, or told it is not for them.

use crate::api::{get_consumers, search_members, IssueAccessLink, StaffAction};
use crate::components::forms::{failed, staff_gate, Field, Outcome};
use crate::domain::member::Status;
use crate::domain::tier::TIERS;
use crate::error::AppError;
use crate::format;
use crate::views::{CommandAck, ConsumerStatus, MemberPage, MemberQuery};
use leptos::prelude::*;
use leptos::server_fn::ServerFn;
use leptos_meta::Title;
use leptos_router::hooks::use_query_map;

/// Server-rendered: the search is a plain GET form, so every search is a page load; the server
/// renders its results and hands the console island its first status.
#[component]
pub fn AdminPage() -> impl IntoView {
    if let Some(refused) = staff_gate("/admin", false) {
        return refused;
    }
    let flash = crate::request::take_flash();
    let search = use_query_map().with_untracked(|q| {
        let get = |k: &str| q.get(k).filter(|v| !v.is_empty());
        MemberQuery { q: get("q"), tier: get("tier"), status: get("status"), limit: Some(20), after: get("after") }
    });
    // Both read before the page renders, under one suspense (a second one nested in the island's
    // children hung the server render).
    let consumers = Resource::new_blocking(|| (), |_| get_consumers());
    let results = Resource::new_blocking(
        {
            let search = search.clone();
            move || search.clone()
        },
        search_members,
    );
    view! {
        <Title text="Staff console: Tally"/>
        <h1>"Staff console"</h1>
        <Suspense fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || {
                let search = search.clone();
                Suspend::new(async move {
                    let (consumers, results) = (consumers.await, results.await);
                    view! {
                        <StaffConsole consumers>
                            <MemberSearch params=search results/>
                        </StaffConsole>
                    }
                })
            }}
        </Suspense>
        <AccessLinkCard flash/>
    }
    .into_any()
}

/// A link for a member to set their password (first access for a member staff enrolled, or a
/// reset): shown once, here, to hand to the member.
#[component]
fn AccessLinkCard(flash: Option<crate::views::Flash>) -> impl IntoView {
    let error = failed::<IssueAccessLink>("access_link");
    view! {
        <section class="card action">
            <h2>"Issue an access link"</h2>
            <form method="post" action=IssueAccessLink::PATH class="form">
                <Field label="Member id" name="member_id"/>
                <button type="submit">"Issue link"</button>
            </form>
            <Outcome form="access_link" error flash/>
        </section>
    }
}

/// Everything interactive on the page, in one island so that a finished action can refresh the
/// status next to it. The search (its children) is server-rendered HTML inside it: a fresh search
/// is a page load, and keeping its results out of the island keeps the island's WASM under the
/// size target (BENCHMARKS.md, P7).
#[island(lazy)]
fn StaffConsole(consumers: Result<Vec<ConsumerStatus>, AppError>, children: Children) -> impl IntoView {
    // One action per form (each shows its own outcome), all of the one server function.
    let enroll = ServerAction::<StaffAction>::new();
    let earn = ServerAction::<StaffAction>::new();
    let redeem = ServerAction::<StaffAction>::new();
    let purchase = ServerAction::<StaffAction>::new();
    let suspend = ServerAction::<StaffAction>::new();
    let reactivate = ServerAction::<StaffAction>::new();
    // Any finished action may have changed what the status shows.
    let actions = [enroll, earn, redeem, purchase, suspend, reactivate];
    let changes = Signal::derive(move || actions.iter().map(|a| a.version().get()).sum::<usize>());

    view! {
        <div class="admin-grid">
            <div class="admin-main">
                {children()}
                <ConsumerPanel initial=consumers changes/>
            </div>
            <div class="admin-actions">
                <ActionCard title="Enroll a member" kind="enroll" action=enroll>
                    <Field label="Name" name="name" placeholder="Ada Lovelace"/>
                    <Field label="Email" name="email" kind="email" placeholder="ada@example.com"/>
                    <button type="submit">"Enroll"</button>
                </ActionCard>
                <ActionCard title="Earn points" kind="earn" action=earn>
                    <Field label="Member id" name="member_id"/>
                    <Field label="Points" name="points" kind="number"/>
                    <Field label="Reason" name="reason" required=false placeholder="Birthday bonus"/>
                    <button type="submit">"Earn"</button>
                </ActionCard>
                <ActionCard title="Redeem points" kind="redeem" action=redeem>
                    <Field label="Member id" name="member_id"/>
                    <Field label="Points" name="points" kind="number"/>
                    <Field label="Reward" name="reward" required=false placeholder="Coffee mug"/>
                    <button type="submit">"Redeem"</button>
                </ActionCard>
                <ActionCard title="Record a purchase" kind="purchase" action=purchase>
                    <Field label="Member id (empty: anonymous)" name="member_id" required=false/>
                    <Field label="Amount" name="amount" placeholder="49.99"/>
                    <Field label="Currency" name="currency" value="EUR"/>
                    <label class="field">
                        <span>"Channel"</span>
                        <select name="channel">
                            <option value="pos">"Point of sale"</option>
                            <option value="ecommerce">"Web shop"</option>
                        </select>
                    </label>
                    <button type="submit">"Record purchase"</button>
                </ActionCard>
                <ActionCard title="Suspend an account" kind="suspend" action=suspend>
                    <Field label="Member id" name="member_id"/>
                    <Field label="Reason" name="reason" required=false/>
                    <button type="submit" class="danger">"Suspend"</button>
                </ActionCard>
                <ActionCard title="Reactivate an account" kind="reactivate" action=reactivate>
                    <Field label="Member id" name="member_id"/>
                    <button type="submit">"Reactivate"</button>
                </ActionCard>
            </div>
        </div>
    }
}

/// A titled form (posting `kind` with its fields) with the outcome of its last submission
/// underneath, in words.
#[component]
fn ActionCard(
    title: &'static str,
    kind: &'static str,
    action: ServerAction<StaffAction>,
    children: Children,
) -> impl IntoView {
    // Without JavaScript the page comes back with the error, and every form's action sees it:
    // only the form it answers shows it.
    let result = move || {
        action.value().get().filter(|r| r.as_ref().err().and_then(|e| e.form.as_deref()).is_none_or(|f| f == kind))
    };
    view! {
        <section class="card action">
            <h2>{title}</h2>
            <ActionForm action attr:class="form">
                <input type="hidden" name="kind" value=kind/>
                {children()}
            </ActionForm>
            {move || result().map(|r| match r {
                Ok(ack) => view! { <Acknowledged ack/> }.into_any(),
                Err(err) => view! {
                    <p class="form-error" role="alert" data-code=err.code.clone()>{err.message}</p>
                }.into_any(),
            })}
        </section>
    }
}

#[component]
fn Acknowledged(ack: CommandAck) -> impl IntoView {
    let text = match (&ack.member_id, &ack.transaction_id) {
        (Some(member), _) => format!("Done: member {member} is at version {}.", ack.version.unwrap_or(0)),
        (None, Some(txn)) => format!("Purchase {txn} recorded; the loyalty policy will reward it."),
        _ => "Done.".to_string(),
    };
    view! {
        <p class="form-ok" role="status">
            {text} " "
            {ack.member_id.map(|id| {
                view! { <a href=format!("/members/{id}?min_position={}", ack.position)>"Open portal"</a> }
            })}
        </p>
    }
}

/// Server-rendered only (never in the WASM): the search form and one page of results.
#[component]
fn MemberSearch(params: MemberQuery, results: Result<MemberPage, AppError>) -> impl IntoView {
    let tiers = TIERS.map(|(t, _)| (t, params.tier.as_deref() == Some(t.as_str())));
    let statuses = [Status::Active, Status::Suspended].map(|s| (s, params.status.as_deref() == Some(s.as_str())));
    let q = params.q.clone().unwrap_or_default();

    view! {
        <section class="card">
            <h2>"Members"</h2>
            <form method="GET" action="/admin" class="search">
                <input type="search" name="q" placeholder="Name or email" aria-label="Search by name or email" value=q/>
                <select name="tier" aria-label="Tier">
                    <option value="">"Any tier"</option>
                    {tiers.into_iter().map(|(t, selected)| view! {
                        <option value=t.as_str() selected=selected>{t.label()}</option>
                    }).collect_view()}
                </select>
                <select name="status" aria-label="Status">
                    <option value="">"Any status"</option>
                    {statuses.into_iter().map(|(s, selected)| view! {
                        <option value=s.as_str() selected=selected>{s.as_str()}</option>
                    }).collect_view()}
                </select>
                <button type="submit">"Search"</button>
            </form>
            {
                    match results {
                        Err(err) => view! { <p class="form-error" role="alert">{err.message}</p> }.into_any(),
                        Ok(page) if page.items.is_empty() => view! { <p class="muted">"No members match."</p> }.into_any(),
                        Ok(page) => {
                            let next = page.next.map(|cursor| {
                                let p = params;
                                let mut href = format!("/admin?after={cursor}");
                                for (k, v) in [("q", p.q), ("tier", p.tier), ("status", p.status)] {
                                    if let Some(v) = v {
                                        href.push_str(&format!("&{k}={}", urlencode(&v)));
                                    }
                                }
                                href
                            });
                            view! {
                                <div class="table-wrap">
                                    <table class="members">
                                        <thead><tr>
                                            <th>"Name"</th><th>"Email"</th><th>"Tier"</th><th>"Status"</th>
                                            <th class="num">"Balance"</th><th>"Id"</th>
                                        </tr></thead>
                                        <tbody>
                                            {page.items.into_iter().map(|m| view! {
                                                <tr>
                                                    <td><a href=format!("/members/{}", m.member_id)>{m.name}</a></td>
                                                    <td>{m.email}</td>
                                                    <td><span class=format!("badge tier-{}", m.tier.as_str())>{m.tier.label()}</span></td>
                                                    <td><span class=format!("badge status-{}", m.status.as_str())>{m.status.as_str()}</span></td>
                                                    <td class="num">{format::points(m.points_balance)}</td>
                                                    <td><code class="small">{m.member_id}</code></td>
                                                </tr>
                                            }).collect_view()}
                                        </tbody>
                                    </table>
                                </div>
                                {next.map(|href| view! { <a class="button secondary" href=href>"Next page"</a> })}
                            }.into_any()
                        }
                    }
            }
        </section>
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The consumers' status: rendered with the page from `initial`, then fetched again every two
/// seconds and after every finished action. A plain signal rather than a resource: the first
/// value arrives as the island's prop, and the resource machinery would cost WASM (P7).
#[component]
fn ConsumerPanel(initial: Result<Vec<ConsumerStatus>, AppError>, changes: Signal<usize>) -> impl IntoView {
    let status = RwSignal::new(initial);
    let refresh = move || leptos::task::spawn_local(async move { status.set(get_consumers().await) });
    #[cfg(feature = "hydrate")]
    if let Ok(handle) = set_interval_with_handle(refresh, std::time::Duration::from_secs(2)) {
        on_cleanup(move || handle.clear());
    }
    // Effects run in the browser only. The first run just subscribes.
    Effect::new(move |seen: Option<usize>| {
        let now = changes.get();
        if seen.is_some_and(|seen| seen != now) {
            refresh();
        }
        now
    });
    view! {
        <section class="card">
            <h2>"Projector and processors"</h2>
            {move || match status.get() {
                Err(err) => view! { <p class="form-error" role="alert">{err.message}</p> }.into_any(),
                Ok(items) => view! {
                    <div class="table-wrap">
                        <table class="consumers">
                            <thead><tr>
                                <th>"Consumer"</th><th class="num">"Position"</th><th class="num">"Head"</th>
                                <th class="num">"Lag"</th><th class="num">"Events/s"</th><th>"State"</th>
                            </tr></thead>
                            <tbody>
                                {items.into_iter().map(|c| view! {
                                    <tr title=c.last_error.clone().unwrap_or_default()>
                                        <td>{c.name}</td>
                                        <td class="num">{format::points(c.position)}</td>
                                        <td class="num">{format::points(c.head)}</td>
                                        <td class="num">{format::points(c.lag)}</td>
                                        <td class="num">{format::rate(c.events_per_second)}</td>
                                        <td><span class=format!("badge state-{}", c.state)>{c.state.clone()}</span></td>
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
