//! The membership card: profile, status, tier and progress, points, recent activity.

use crate::domain::member::Status;
use crate::domain::tier::{self, Tier};
use crate::format;
use crate::views::{Activity, MembershipView};
use leptos::prelude::*;

#[component]
pub fn MembershipCard(view: MembershipView, connected: Signal<bool>) -> impl IntoView {
    let MembershipView {
        member_id,
        name,
        email,
        status,
        tier,
        points_balance,
        lifetime_points,
        recent_activity,
        member_since,
        position,
        ..
    } = view;
    let progress = tier::progress(lifetime_points);
    let suspended = status == Status::Suspended;
    view! {
        <article class="membership" data-position=position.to_string()>
            <header class="membership-head">
                <div>
                    <h1 class="member-name">{name}</h1>
                    <p class="muted">{email} " · member since " {format::month_year(&member_since)}</p>
                </div>
                <LiveIndicator connected/>
            </header>

            {suspended.then(|| view! {
                <p class="notice warning" role="status">"This account is suspended: points can't be earned or redeemed."</p>
            })}

            <section class="stats">
                <div class="stat">
                    <span class="stat-label">"Points balance"</span>
                    <span class="stat-value" data-testid="points-balance">{format::points(points_balance)}</span>
                </div>
                <div class="stat">
                    <span class="stat-label">"Lifetime points"</span>
                    <span class="stat-value" data-testid="lifetime-points">{format::points(lifetime_points)}</span>
                </div>
                <div class="stat">
                    <span class="stat-label">"Status"</span>
                    <span class=format!("badge status-{}", status.as_str()) data-testid="status">
                        {if suspended { "Suspended" } else { "Active" }}
                    </span>
                </div>
            </section>

            <TierProgress tier lifetime_points progress/>

            <section class="activity">
                <h2>"Recent activity"</h2>
                {if recent_activity.is_empty() {
                    view! { <p class="muted">"Nothing yet."</p> }.into_any()
                } else {
                    view! {
                        <ol class="activity-list">
                            {recent_activity.into_iter().map(|a| view! { <ActivityRow activity=a/> }).collect_view()}
                        </ol>
                    }.into_any()
                }}
            </section>
            <p class="muted small">"Member id " <code>{member_id}</code></p>
        </article>
    }
}

#[component]
fn TierProgress(tier: Tier, lifetime_points: u64, progress: Option<(Tier, u64, u8)>) -> impl IntoView {
    view! {
        <section class="tier">
            <div class="tier-row">
                <span class=format!("badge tier-{}", tier.as_str()) data-testid="tier">{tier.label()}</span>
                {match progress {
                    Some((next, needed, _)) => view! {
                        <span class="muted" data-testid="next-tier">
                            {format::points(needed)} " points to " {next.label()}
                        </span>
                    }.into_any(),
                    None => view! { <span class="muted" data-testid="next-tier">"Top tier reached"</span> }.into_any(),
                }}
            </div>
            {progress.map(|(next, _, percent)| view! {
                // A <progress> rather than a bar sized by a style attribute: the page's CSP allows
                // no inline styles.
                <progress class="progress" max="100" value=percent.to_string()
                    aria-label=format!("Progress to {}", next.label())>{format!("{percent}%")}</progress>
                <div class="progress-scale muted small">
                    <span>{format::points(tier.threshold())}</span>
                    <span>{format::points(lifetime_points)} " lifetime"</span>
                    <span>{format::points(next.threshold())}</span>
                </div>
            })}
        </section>
    }
}

#[component]
fn ActivityRow(activity: Activity) -> impl IntoView {
    let sign = match activity.kind.as_str() {
        "earned" => "+",
        "redeemed" => "−",
        _ => "",
    };
    let points = (activity.points > 0).then(|| format!("{sign}{}", format::points(activity.points)));
    view! {
        <li class=format!("activity-item kind-{}", activity.kind)>
            <span class="activity-desc">{activity.description}</span>
            <span class="activity-points">{points}</span>
            <time class="activity-at muted small" datetime=activity.at.clone()>{format::when(&activity.at)}</time>
        </li>
    }
}

#[component]
fn LiveIndicator(connected: Signal<bool>) -> impl IntoView {
    view! {
        <span class="live" class:on=move || connected.get() data-testid="live-indicator">
            <span class="dot"></span>
            {move || if connected.get() { "Live" } else { "Not live" }}
        </span>
    }
}
