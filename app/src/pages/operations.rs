//! `/admin/operations` (staff; the actions are for admins): how each consumer moves, as small
//! charts of its throughput and lag over the last two minutes, pushed over the live socket (topic
//! `operations`, a sample a second: no polling); and the streams the consumers hold back (parked
//! events, see docs/api.md), with retry and skip; and, for admins, a Rebuild button per projection
//! (an online, blue/green rebuild) whose progress shows in its chart's card as it goes; and each
//! change data capture source (its lag, rows per second, last error) as of the page's load. The
//! charts are one island; the forms are plain, so they work without JavaScript.

use crate::api::{get_cdc_sources, get_consumers, get_parked, RebuildProjection, RetryParked, SkipParked};
use crate::components::forms::{failed, staff_gate, Outcome};
use crate::error::AppError;
use crate::format;
use crate::views::{
    CdcSource, ConsumerStatus, Flash, ParkedRow, ParkedStream, RebuildStatus, OPERATIONS_WINDOW as WINDOW,
};
use leptos::prelude::*;
use leptos::server_fn::ServerFn;
use leptos_meta::Title;

#[component]
pub fn OperationsPage() -> impl IntoView {
    if let Some(refused) = staff_gate("/admin/operations", false) {
        return refused;
    }
    let admin = crate::request::caller().is_admin();
    let flash = crate::request::take_flash();
    let consumers = Resource::new_blocking(|| (), |_| get_consumers());
    let parked = Resource::new_blocking(|| (), |_| get_parked());
    let cdc = Resource::new_blocking(|| (), |_| get_cdc_sources());
    let error = failed::<RetryParked>("parked").or_else(|| failed::<SkipParked>("parked"));
    let rebuild_error = failed::<RebuildProjection>("rebuild");
    view! {
        <Title text="Operations: Tally"/>
        <h1>"Operations"</h1>
        <Suspense fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || {
                let (flash, error, rebuild_error) = (flash.clone(), error.clone(), rebuild_error.clone());
                Suspend::new(async move {
                    let (consumers, parked, cdc) = (consumers.await, parked.await, cdc.await);
                    view! {
                        <Outcome form="rebuild" error=rebuild_error flash=flash.clone()/>
                        {match consumers {
                            Ok(initial) => view! { <LiveCharts initial admin/> }.into_any(),
                            Err(err) => view! { <p class="form-error" role="alert">{err.message}</p> }.into_any(),
                        }}
                        <ParkedStreams parked admin flash error/>
                        <CdcSources sources=cdc/>
                    }
                })
            }}
        </Suspense>
    }
    .into_any()
}

/// Per consumer: its state now, and charts of events per second and lag. Server-rendered from
/// the first sample; in the browser, each pushed sample adds a point.
#[island(lazy)]
fn LiveCharts(initial: Vec<ConsumerStatus>, admin: bool) -> impl IntoView {
    let samples: RwSignal<Vec<Vec<ConsumerStatus>>> = RwSignal::new(vec![initial]);
    let connected = RwSignal::new(false);
    #[cfg(feature = "hydrate")]
    {
        crate::live::watch_operations(samples, connected);
        on_cleanup(crate::live::stop);
    }
    view! {
        <p class="small muted">
            <span class="live" class:on=move || connected.get() data-testid="live-indicator"></span>
            " Events per second and lag of each consumer over the last two minutes, a point a second, as this node sees them."
        </p>
        <div class="charts">
            {move || samples.with(|history| {
                let latest = history.last().cloned().unwrap_or_default();
                latest.into_iter().map(|c| {
                    let series = |pick: fn(&ConsumerStatus) -> f64| -> Vec<f64> {
                        history.iter().map(|s| s.iter().find(|x| x.name == c.name).map_or(0.0, pick)).collect()
                    };
                    let (rate, lag) = (series(|x| x.events_per_second), series(|x| x.lag as f64));
                    view! {
                        <section class="card chart" data-testid=format!("chart-{}", c.name)>
                            <h2>
                                {c.name.clone()} " "
                                <span class=format!("badge state-{}", c.state)>{c.state.clone()}</span>
                            </h2>
                            <p class="small muted">
                                {format::rate(c.events_per_second)} " events/s · lag " {format::points(c.lag)}
                                {(c.parked > 0).then(|| format!(" · {} parked", c.parked))}
                            </p>
                            <Sparkline label="Events per second" values=rate kind="rate"/>
                            <Sparkline label="Lag (events)" values=lag kind="lag"/>
                            {c.rebuild.clone().map(|status| view! { <RebuildProgress status/> })}
                            {(admin && c.rebuildable && c.rebuild.is_none()).then(|| view! {
                                <form method="post" action=RebuildProjection::PATH class="inline">
                                    <input type="hidden" name="projection" value=c.name.clone()/>
                                    <button type="submit" class="small">"Rebuild"</button>
                                </form>
                            })}
                        </section>
                    }
                }).collect_view()
            })}
        </div>
    }
}

/// Each change data capture source: how far behind its system of record, how fast, what went
/// wrong last (docs/cdc.md). Nothing when none is configured.
#[component]
fn CdcSources(sources: Result<Vec<CdcSource>, AppError>) -> impl IntoView {
    let sources = match sources {
        Err(err) => return view! { <p class="form-error" role="alert">{err.message}</p> }.into_any(),
        Ok(sources) if sources.is_empty() => return ().into_any(),
        Ok(sources) => sources,
    };
    let mb = |bytes: Option<i64>| bytes.map_or("–".to_string(), |b| format!("{:.1} MB", b as f64 / 1_048_576.0));
    view! {
        <section class="card" data-testid="cdc">
            <h2>"Change data capture"</h2>
            <div class="table-wrap">
                <table>
                    <thead><tr>
                        <th>"Source"</th><th>"State"</th><th class="num">"Lag"</th><th class="num">"Retained WAL"</th>
                        <th class="num">"Rows/s"</th><th class="num">"Applied"</th><th>"Last error"</th>
                    </tr></thead>
                    <tbody>
                        {sources.into_iter().map(|s| view! {
                            <tr data-testid=format!("cdc-{}", s.name)>
                                <td><code>{s.name.clone()}</code> " " <span class="small muted">{s.kind.clone()}</span></td>
                                <td>
                                    <span class=format!("badge state-{}", s.state)>{s.state.clone()}</span>
                                    {s.warning.clone().map(|w| view! { <p class="small form-error">{w}</p> })}
                                </td>
                                <td class="num">{mb(s.lag_bytes)} " · " {format!("{:.1} s", s.lag_seconds)}</td>
                                <td class="num">{mb(s.retained_wal_bytes)}</td>
                                <td class="num">{format::rate(s.rows_per_second)}</td>
                                <td class="num">{format::points(s.rows.applied)}</td>
                                <td><code class="small">{s.last_error.clone().unwrap_or_default()}</code></td>
                            </tr>
                        }).collect_view()}
                    </tbody>
                </table>
            </div>
        </section>
    }
    .into_any()
}

/// An online rebuild under way: its phase and a bar of the events folded.
#[component]
fn RebuildProgress(status: RebuildStatus) -> impl IntoView {
    let build = status;
    let label = match (&build.phase, build.state.as_str()) {
        (Some(phase), _) => phase.replace('_', " "),
        (None, state) => state.to_string(),
    };
    let eta = build.eta_seconds.map(|s| format!(", about {s:.0} s left"));
    view! {
        <div class="rebuild" data-testid=format!("rebuild-{}", build.projection)>
            <p class="small">
                "Rebuilding (#" {build.id} ", version " {build.version} "): " <strong>{label}</strong> " · "
                {format::points(build.applied)} " of " {format::points(build.total)} " events · "
                {format::rate(build.events_per_second)} " events/s" {eta}
            </p>
            <progress max="1000" value=(build.fraction() * 1000.0).round().to_string()></progress>
        </div>
    }
}

/// A line over the last `WINDOW` values, newest at the right, scaled to the largest.
#[component]
fn Sparkline(label: &'static str, values: Vec<f64>, kind: &'static str) -> impl IntoView {
    const W: f64 = 240.0;
    const H: f64 = 48.0;
    let max = values.iter().copied().fold(0.0_f64, f64::max);
    let step = W / (WINDOW - 1) as f64;
    let n = values.len();
    let points = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let x = W - (n - 1 - i) as f64 * step;
            let y = if max > 0.0 { H - 2.0 - v / max * (H - 4.0) } else { H - 2.0 };
            format!("{x:.1},{y:.1}")
        })
        .collect::<Vec<_>>()
        .join(" ");
    view! {
        <figure class=format!("spark spark-{kind}")>
            <svg viewBox="0 0 240 48" preserveAspectRatio="none" role="img" aria-label=label>
                <polyline points=points/>
            </svg>
            <figcaption class="small muted">{label} " (max " {format::rate(max)} ")"</figcaption>
        </figure>
    }
}

/// The streams held back, per consumer, with retry and skip for admins; and what was skipped.
#[component]
fn ParkedStreams(
    parked: Result<Vec<ParkedRow>, AppError>,
    admin: bool,
    flash: Option<Flash>,
    error: Option<AppError>,
) -> impl IntoView {
    let rows = match parked {
        Err(err) => return view! { <p class="form-error" role="alert">{err.message}</p> }.into_any(),
        Ok(rows) => rows,
    };
    let (skipped, open): (Vec<ParkedRow>, Vec<ParkedRow>) =
        rows.into_iter().partition(|r| r.stream.skipped_through.is_some());
    view! {
        <section class="card" data-testid="parked">
            <h2>"Parked streams"</h2>
            <p class="small muted">
                "An event a consumer could not apply is parked with the rest of its stream; every other stream goes on. "
                "Retry applies the parked events again, in order (after a fix); skip leaves them out for good, with a reason."
            </p>
            <Outcome form="parked" error flash/>
            {if open.is_empty() {
                view! { <p class="muted" data-testid="no-parked">"Nothing is parked."</p> }.into_any()
            } else {
                view! {
                    <div class="table-wrap">
                        <table class="parked">
                            <thead><tr>
                                <th>"Consumer"</th><th>"Stream"</th><th class="num">"From"</th><th>"Event"</th>
                                <th class="num">"Held"</th><th>"Error"</th><th></th>
                            </tr></thead>
                            <tbody>
                                {open.into_iter().map(|r| view! { <ParkedRowView row=r admin/> }).collect_view()}
                            </tbody>
                        </table>
                    </div>
                }.into_any()
            }}
            {(!skipped.is_empty()).then(|| view! {
                <h3>"Skipped"</h3>
                <ul class="small">
                    {skipped.into_iter().map(|ParkedRow { consumer, stream: s, .. }| view! {
                        <li>
                            <code>{consumer}</code> " " <code>{s.stream_id}</code> " positions "
                            {format::points(s.from_position)} "–" {format::points(s.skipped_through.unwrap_or_default())}
                            ": " {s.reason.unwrap_or_default()} " (" {s.actor.unwrap_or_default()} ", "
                            {s.skipped_at.as_deref().map(format::when).unwrap_or_default()} ")"
                        </li>
                    }).collect_view()}
                </ul>
            })}
        </section>
    }
    .into_any()
}

#[component]
fn ParkedRowView(row: ParkedRow, admin: bool) -> impl IntoView {
    let ParkedRow { consumer, held, stream } = row;
    let ParkedStream { stream_id, from_position, event_type, error, .. } = stream;
    let actions = admin.then(|| {
        let (consumer, stream_id) = (consumer.clone(), stream_id.clone());
        view! {
            <form method="post" action=RetryParked::PATH class="inline">
                <input type="hidden" name="consumer" value=consumer.clone()/>
                <input type="hidden" name="stream_id" value=stream_id.clone()/>
                <button type="submit" class="small">"Retry"</button>
            </form>
            <form method="post" action=SkipParked::PATH class="inline">
                <input type="hidden" name="consumer" value=consumer/>
                <input type="hidden" name="stream_id" value=stream_id/>
                <input type="text" name="reason" required placeholder="Why skip?" aria-label="Reason to skip"/>
                <button type="submit" class="danger small">"Skip"</button>
            </form>
        }
    });
    view! {
        <tr>
            <td><code>{consumer}</code></td>
            <td><code>{stream_id}</code></td>
            <td class="num">{format::points(from_position)}</td>
            <td>{event_type}</td>
            <td class="num">{format::points(held)}</td>
            <td><code class="small">{error}</code></td>
            <td>{actions}</td>
        </tr>
    }
}
