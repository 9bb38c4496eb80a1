//! Tally's server, as a library so that `main`, the CLI tools and the tests build the same app.

pub mod auth;
pub mod cdc;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod consumers;
pub mod fanout;
pub mod faults;
pub mod health;
pub mod http;
pub mod identity;
pub mod leader;
pub mod live;
pub mod notices;
pub mod operations;
pub mod portal;
pub mod processors;
pub mod projector;
pub mod queries;
pub mod rebuild;
pub mod seed;
pub mod store;
pub mod telemetry;
pub mod view_cache;

use anyhow::Context;
use app::{shell, App};
use axum::extract::FromRef;
use axum::response::IntoResponse;
use axum::Router;
use config::ServeArgs;
use leptos::prelude::*;
use leptos_axum::{generate_route_list, LeptosRoutes};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

/// Everything a request handler may need, behind one `Arc`: axum clones the state for every
/// request, and cloning the fields one by one (the Leptos options' strings, the store's path and
/// pools) was ~10 % of the server's CPU when serving views from memory. Fields are reached through
/// `Deref` (`state.store`).
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl std::ops::Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.0
    }
}

pub struct Services {
    pub store: store::Store,
    pub bus: commands::CommandBus,
    pub consumers: Arc<projector::Consumers>,
    pub feed: Arc<fanout::ViewFeed>,
    pub hub: Arc<live::Hub>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub leptos_options: LeptosOptions,
    pub auth: Arc<auth::Auth>,
    /// See `AccessArgs::client_ip_header`.
    pub client_ip_header: Option<String>,
    /// See `AccessArgs::ws_idle_secs`.
    pub ws_idle: Duration,
    /// Change data capture sources (none unless `--cdc-config`).
    pub cdc: Arc<cdc::Cdc>,
}

impl FromRef<AppState> for LeptosOptions {
    fn from_ref(state: &AppState) -> Self {
        state.leptos_options.clone()
    }
}

/// A built server: bound, consumers running, ready to serve.
pub struct Tally {
    pub state: AppState,
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    header_timeout: Duration,
}

/// Open the store, start the writer and the consumers, bind the address, build the routes.
pub async fn build(args: &ServeArgs) -> anyhow::Result<Tally> {
    // Install the metrics recorder before any task records a value.
    let metrics = telemetry::metrics();
    let db = &args.db;
    let mut store = store::Store::open(
        &db.database_url,
        &store::PoolSizes { read: db.read_pool, write: db.write_pool },
        db.durable,
    )
    .await?;
    store.faults = args.faults.clone();
    store.health.set_grace(Duration::from_secs(args.unhealthy_after_secs));
    let health = store.health.clone();
    rebuild::repair_views_ahead_of_log(&store).await.context("checking the views against the event log")?;
    let head = Arc::new(watch::Sender::new(store.head().await.context("reading the event store head")?));
    let (bus, writer) = commands::CommandBus::start(store.clone(), head.clone());
    let hub = Arc::new(live::Hub::default());
    let shutdown = CancellationToken::new();
    let feed = Arc::new(fanout::ViewFeed::new(
        hub.clone(),
        store.backend,
        projector::load_checkpoint(&store, projector::membership_view::NAME).await?,
        head.clone(),
    ));
    let consumers = projector::Consumers::new(
        store.clone(),
        consumers::groups(&store),
        head.clone(),
        feed.clone(),
        projector::Tuning {
            poll: Duration::from_millis(args.poll_ms.max(10)),
            write_behind: Duration::from_millis(args.write_behind_ms),
            park_after: args.park_after,
        },
    );
    let access = &args.access;
    let auth_config = auth::AuthConfig::new(
        &access.public_url,
        *access.session_idle,
        access.max_sockets_per_principal,
        access.hash_concurrency.unwrap_or_else(auth::password::Passwords::default_concurrency),
    )?;
    let auth = Arc::new(auth::Auth::new(store.clone(), auth_config));
    // Every background task is supervised: restarted with backoff if it panics or ends early.
    let mut tasks = vec![
        writer,
        health::spawn_supervised(health.clone(), "idempotency key pruner", shutdown.clone(), {
            let (store, shutdown) = (store.clone(), shutdown.clone());
            move || prune_keys(store.clone(), shutdown.clone())
        }),
        health::spawn_supervised(health.clone(), "identity maintenance", shutdown.clone(), {
            let (auth, shutdown) = (auth.clone(), shutdown.clone());
            move || auth.clone().maintain(shutdown.clone())
        }),
        health::spawn_supervised(health.clone(), "operations sampler", shutdown.clone(), {
            let (hub, consumers, shutdown) = (hub.clone(), consumers.clone(), shutdown.clone());
            move || operations::publish(hub.clone(), consumers.clone(), shutdown.clone())
        }),
    ];
    let (cdc, readers) = cdc::Cdc::start(args.cdc_config.as_deref(), &bus, &health, &shutdown)
        .context("starting change data capture")?;
    tasks.extend(readers);
    match store.backend {
        // One node: run the consumers here, now.
        store::Backend::Sqlite => tasks.extend(consumers.run(shutdown.clone())),
        // Many nodes: run them only while this node holds the leader lock; hear every node's
        // view changes.
        store::Backend::Postgres => {
            let url = store::normalize_url(&db.database_url);
            let retry = Duration::from_millis(args.leader_retry_ms.max(50));
            tasks.push(health::spawn_supervised(health.clone(), "consumer leadership", shutdown.clone(), {
                let (url, consumers, shutdown) = (url.clone(), consumers.clone(), shutdown.clone());
                move || leader::lead(url.clone(), consumers.clone(), shutdown.clone(), retry)
            }));
            tasks.push(health::spawn_supervised(health.clone(), "notice listener", shutdown.clone(), {
                let (store, feed, auth, shutdown) = (store.clone(), feed.clone(), auth.clone(), shutdown.clone());
                move || notices::listen(url.clone(), store.clone(), feed.clone(), Some(auth.clone()), shutdown.clone())
            }));
        }
    }

    let leptos_options = get_configuration(None).context("reading Leptos configuration")?.leptos_options;
    let state = AppState(Arc::new(Services {
        store,
        bus,
        consumers,
        feed,
        hub,
        metrics,
        leptos_options: leptos_options.clone(),
        auth,
        client_ip_header: access.client_ip_header.clone().filter(|h| !h.trim().is_empty()),
        ws_idle: Duration::from_secs(access.ws_idle_secs.max(1)),
        cdc,
    }));
    if args.demo {
        seed::demo_if_empty(&state).await.context("seeding demo members")?;
        seed::demo_accounts(&state).await.context("creating the demo accounts")?;
    }
    let router = router(state.clone(), Duration::from_secs(args.request_timeout_secs.max(1)));
    let listener = TcpListener::bind(args.addr).await.with_context(|| format!("cannot listen on {}", args.addr))?;
    let header_timeout = Duration::from_secs(access.header_timeout_secs.max(1));
    Ok(Tally { state, listener, router, shutdown, tasks, header_timeout })
}

fn router(state: AppState, timeout: Duration) -> Router {
    let server_portal = Arc::new(portal::ServerPortal::new(state.clone()));
    let portal: Arc<dyn app::api::Portal> = server_portal.clone();
    let identity: Arc<dyn app::api::Identity> = server_portal;
    let routes = generate_route_list(App);
    let options = state.leptos_options.clone();
    let pages = Router::<AppState>::new()
        .leptos_routes_with_context(
            &state,
            routes,
            move || {
                provide_context(portal.clone());
                provide_context(identity.clone());
            },
            move || shell(options.clone()),
        )
        .fallback(leptos_axum::file_and_error_handler::<AppState, _>(shell))
        // A fresh nonce for each page, and the CSP that allows only the scripts carrying it.
        .layer(axum::middleware::from_fn(http::headers::page_csp))
        // Server functions read their bodies themselves: limited here, like every route.
        .layer(tower_http::limit::RequestBodyLimitLayer::new(http::MAX_BODY_BYTES));
    let timed = http::api_routes()
        .merge(pages)
        .layer(TimeoutLayer::with_status_code(axum::http::StatusCode::REQUEST_TIMEOUT, timeout))
        .layer(CompressionLayer::new());
    let sessions = tower_sessions::SessionManagerLayer::new(state.auth.sessions.clone())
        .with_name(auth::sessions::COOKIE)
        .with_http_only(true)
        .with_same_site(tower_sessions::cookie::SameSite::Lax)
        .with_secure(state.auth.config.https)
        .with_path("/")
        .with_expiry(tower_sessions::Expiry::OnInactivity(auth::sessions::idle(state.auth.config.session_idle)));
    // The socket lives long: no timeout, no compression layer.
    let app = Router::new()
        .route("/ws", axum::routing::get(http::live::ws))
        .merge(timed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), http::guard::authenticate))
        .layer(sessions);
    http::headers::add(app, state.auth.config.https)
        .layer(TraceLayer::new_for_http())
        .layer(CatchPanicLayer::custom(|_| {
            http::error::ApiError::Internal(anyhow::anyhow!("a request handler panicked")).into_response()
        }))
        .with_state(state)
}

impl Tally {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A token that stops the server when cancelled (tests use it to restart on the same file).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serve until `shutdown` is cancelled: stop accepting, finish in-flight requests (their
    /// commands are committed before they answer), then let the consumers commit and stop.
    ///
    /// The accept loop is hyper's own rather than `axum::serve`, for one setting that has no
    /// other way in: a time limit on reading a request's headers, without which a client that
    /// sends them a byte at a time holds a connection (and its memory) for ever.
    pub async fn serve(self) -> anyhow::Result<()> {
        use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
        use tower::{Layer, ServiceExt};
        let Tally { state, listener, router, shutdown, tasks, header_timeout } = self;
        tracing::info!(addr = %listener.local_addr()?, "tally listening");
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors, most likely: wait rather than spin.
                        tracing::warn!(error = %err, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            // No Nagle delay: a live view pushed right after another would otherwise wait for
            // the client's acknowledgement of the first.
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(error = %err, "cannot set TCP_NODELAY");
            }
            let service = axum::Extension(axum::extract::ConnectInfo(remote))
                .layer(router.clone())
                .map_request(|request: axum::http::Request<hyper::body::Incoming>| request.map(axum::body::Body::new));
            let service = hyper_util::service::TowerToHyperService::new(service);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service).into_owned();
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::trace!(error = %err, "connection ended with an error");
                }
            });
        }
        drop(listener);
        if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await.is_err() {
            tracing::warn!("some connections were still busy 30 s after shutdown began");
        }
        shutdown.cancel();
        // The routes hold the state, and with it the command bus: the writer stops once the last
        // sender is gone.
        drop(router);
        drop(state);
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        Ok(())
    }
}

/// Idempotency keys are kept 7 days (API.md promises at least 24 hours), the ones the server made
/// an hour (see `commands::SERVER_SCOPE`); pruned every ten minutes, 1,000 at a time (a few
/// milliseconds of the write connection each).
async fn prune_keys(store: store::Store, shutdown: CancellationToken) {
    loop {
        let pruned = match store.prune_idempotency_keys(chrono::Duration::days(7), 1_000).await {
            Ok(clients) => {
                // Only a batch run again after a failure reads them (see `commands::SERVER_SCOPE`).
                let server_made = Some(commands::SERVER_SCOPE);
                store.prune_keys_in(server_made, chrono::Duration::hours(1), 1_000).await.map(|s| s + clients)
            }
            Err(err) => Err(err),
        };
        match pruned {
            Ok(n) if n > 0 => tracing::info!(removed = n, "pruned old idempotency keys"),
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "could not prune idempotency keys"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Cancel `token` on ctrl-c or SIGTERM.
pub async fn shutdown_on_signal(token: CancellationToken) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
    token.cancel();
}
