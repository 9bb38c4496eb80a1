//! `/admin`: the staff console. Member search, the actions (each an `ActionForm`, so it works
//! without JavaScript too), and the consumers' status. The console is one island: it hydrates from
//! its own WASM chunk, which visitors of the other pages never download.

use crate::api::{
    get_consumers, search_members, EarnPoints, EnrollMember, ReactivateMember, RecordPurchase, RedeemPoints,
    SuspendMember,
};
use crate::domain::member::Status;
use crate::domain::tier::TIERS;
use crate::error::AppError;
use crate::format;
use crate::views::{CommandAck, MemberQuery};
use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::hooks::use_query_map;

/// Server-rendered: the search is a plain GET form, so every search is a page load whose query the
/// server hands to the console.
#[component]
pub fn AdminPage() -> impl IntoView {
    let search = use_query_map().with_untracked(|q| {
        let get = |k: &str| q.get(k).filter(|v| !v.is_empty());
        MemberQuery { q: get("q"), tier: get("tier"), status: get("status"), limit: Some(20), after: get("after") }
    });
    view! {
        <Title text="Staff console: Tally"/>
        <h1>"Staff console"</h1>
        <StaffConsole search/>
    }
}

/// Everything interactive on the page, in one island so that a finished action can refresh the
/// search and the status next to it.
#[island(lazy)]
fn StaffConsole(search: MemberQuery) -> impl IntoView {
    let enroll = ServerAction::<EnrollMember>::new();
    let earn = ServerAction::<EarnPoints>::new();
    let redeem = ServerAction::<RedeemPoints>::new();
    let suspend = ServerAction::<SuspendMember>::new();
    let reactivate = ServerAction::<ReactivateMember>::new();
    let purchase = ServerAction::<RecordPurchase>::new();
    // Any finished action may have changed what the search and the status show.
    let changes = move || {
        (
            enroll.version().get(),
            earn.version().get(),
            redeem.version().get(),
            suspend.version().get(),
            reactivate.version().get(),
            purchase.version().get(),
        )
    };

    view! {
        <div class="admin-grid">
            <div class="admin-main">
                <MemberSearch params=search changes=Signal::derive(move || format!("{:?}", changes()))/>
                <ConsumerPanel changes=Signal::derive(move || format!("{:?}", changes()))/>
            </div>
            <div class="admin-actions">
                <ActionCard title="Enroll a member" result=Signal::derive(move || enroll.value().get())>
                    <ActionForm action=enroll attr:class="form">
                        <Field label="Name" name="name" placeholder="Ada Lovelace"/>
                        <Field label="Email" name="email" kind="email" placeholder="ada@example.com"/>
                        <button type="submit">"Enroll"</button>
                    </ActionForm>
                </ActionCard>
                <ActionCard title="Earn points" result=Signal::derive(move || earn.value().get())>
                    <ActionForm action=earn attr:class="form">
                        <Field label="Member id" name="member_id"/>
                        <Field label="Points" name="points" kind="number"/>
                        <Field label="Reason" name="reason" required=false placeholder="Birthday bonus"/>
                        <button type="submit">"Earn"</button>
                    </ActionForm>
                </ActionCard>
                <ActionCard title="Redeem points" result=Signal::derive(move || redeem.value().get())>
                    <ActionForm action=redeem attr:class="form">
                        <Field label="Member id" name="member_id"/>
                        <Field label="Points" name="points" kind="number"/>
                        <Field label="Reward" name="reward" required=false placeholder="Coffee mug"/>
                        <button type="submit">"Redeem"</button>
                    </ActionForm>
                </ActionCard>
                <ActionCard title="Record a purchase" result=Signal::derive(move || purchase.value().get())>
                    <ActionForm action=purchase attr:class="form">
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
                    </ActionForm>
                </ActionCard>
                <ActionCard title="Suspend an account" result=Signal::derive(move || suspend.value().get())>
                    <ActionForm action=suspend attr:class="form">
                        <Field label="Member id" name="member_id"/>
                        <Field label="Reason" name="reason" required=false/>
                        <button type="submit" class="danger">"Suspend"</button>
                    </ActionForm>
                </ActionCard>
                <ActionCard title="Reactivate an account" result=Signal::derive(move || reactivate.value().get())>
                    <ActionForm action=reactivate attr:class="form">
                        <Field label="Member id" name="member_id"/>
                        <button type="submit">"Reactivate"</button>
                    </ActionForm>
                </ActionCard>
            </div>
        </div>
    }
}

#[component]
fn Field(
    label: &'static str,
    name: &'static str,
    #[prop(default = "text")] kind: &'static str,
    #[prop(default = true)] required: bool,
    #[prop(default = "")] placeholder: &'static str,
    #[prop(default = "")] value: &'static str,
) -> impl IntoView {
    view! {
        <label class="field">
            <span>{label}</span>
            <input type=kind name=name required=required placeholder=placeholder value=value
                step=(kind == "number").then_some("1")/>
        </label>
    }
}

/// A titled form with the outcome of its last submission underneath, in words.
#[component]
fn ActionCard(
    title: &'static str,
    result: Signal<Option<Result<CommandAck, AppError>>>,
    children: Children,
) -> impl IntoView {
    view! {
        <section class="card action">
            <h2>{title}</h2>
            {children()}
            {move || result.get().map(|r| match r {
                Ok(ack) => view! { <Outcome ack/> }.into_any(),
                Err(err) => view! {
                    <p class="form-error" role="alert" data-code=err.code.clone()>{err.message}</p>
                }.into_any(),
            })}
        </section>
    }
}

#[component]
fn Outcome(ack: CommandAck) -> impl IntoView {
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

#[component]
fn MemberSearch(params: MemberQuery, changes: Signal<String>) -> impl IntoView {
    let selected = |key: &str, value: &str| match key {
        "tier" => params.tier.as_deref() == Some(value),
        _ => params.status.as_deref() == Some(value),
    };
    let tiers = TIERS.map(|(t, _)| (t, selected("tier", t.as_str())));
    let statuses = [Status::Active, Status::Suspended].map(|s| (s, selected("status", s.as_str())));
    let q = params.q.clone().unwrap_or_default();
    let next_query = params.clone();
    let results = Resource::new(move || changes.get(), move |_| search_members(params.clone()));

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
            <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
                {move || {
                let next_query = next_query.clone();
                Suspend::new(async move {
                    match results.await {
                        Err(err) => view! { <p class="form-error" role="alert">{err.message}</p> }.into_any(),
                        Ok(page) if page.items.is_empty() => view! { <p class="muted">"No members match."</p> }.into_any(),
                        Ok(page) => {
                            let next = page.next.map(|cursor| {
                                let p = next_query;
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
                })
                }}
            </Transition>
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

#[component]
fn ConsumerPanel(changes: Signal<String>) -> impl IntoView {
    let tick = RwSignal::new(0u32);
    #[cfg(feature = "hydrate")]
    {
        // Refresh the status every two seconds while the console is open.
        if let Ok(handle) =
            set_interval_with_handle(move || tick.update(|t| *t += 1), std::time::Duration::from_secs(2))
        {
            on_cleanup(move || handle.clear());
        }
    }
    let status = Resource::new(move || (tick.get(), changes.get()), |_| get_consumers());
    view! {
        <section class="card">
            <h2>"Projector and processors"</h2>
            <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
                {move || Suspend::new(async move {
                    match status.await {
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
                                                <td class="num">{format!("{:.1}", c.events_per_second)}</td>
                                                <td><span class=format!("badge state-{}", c.state)>{c.state.clone()}</span></td>
                                            </tr>
                                        }).collect_view()}
                                    </tbody>
                                </table>
                            </div>
                        }.into_any(),
                    }
                })}
            </Transition>
        </section>
    }
}
