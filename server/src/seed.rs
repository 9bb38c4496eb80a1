//! `tally migrate`, `tally seed` and the demo members of `serve --demo`: data through the real
//! command path (the same bus, rules and idempotency as the HTTP API).

use crate::commands::{Command, CommandBus, Envelope, MemberAction, Meta};
use crate::config::{DatabaseArgs, SeedArgs};
use crate::store::{self, PoolSizes, Store};
use crate::{clock, projector, AppState};
use anyhow::Context;
use app::domain::transaction::{Channel, Purchase};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub async fn migrate(db: &DatabaseArgs) -> anyhow::Result<()> {
    open(db).await?;
    println!("database at {} is up to date", store::redact(&store::normalize_url(&db.database_url)));
    Ok(())
}

async fn open(db: &DatabaseArgs) -> anyhow::Result<Store> {
    Store::open(&db.database_url, &PoolSizes { read: db.read_pool, write: db.write_pool }, db.durable).await
}

fn envelope(command: Command) -> Envelope {
    Envelope {
        command,
        expected_version: None,
        idempotency: None,
        meta: Meta { correlation_id: uuid::Uuid::new_v4().to_string(), causation_id: None, actor: "system".into() },
    }
}

const FIRST: [&str; 12] =
    ["Ada", "Grace", "Alan", "Linus", "Barbara", "Edsger", "Margaret", "Dennis", "Frances", "Ken", "Radia", "Tim"];
const LAST: [&str; 10] =
    ["Lovelace", "Hopper", "Turing", "Torvalds", "Liskov", "Dijkstra", "Hamilton", "Ritchie", "Allen", "Thompson"];

/// `tally seed --members N --purchases M`
pub async fn run(args: &SeedArgs) -> anyhow::Result<()> {
    let store = open(&args.db).await?;
    let head = Arc::new(watch::Sender::new(store.head().await?));
    let (bus, writer) = CommandBus::start(store.clone(), head.clone());
    let shutdown = CancellationToken::new();
    // Seeding runs the consumers itself; on PostgreSQL stop any running server first, or let
    // it do the projecting (both at once are safe: batches lock their checkpoint).
    let feed =
        Arc::new(crate::fanout::ViewFeed::new(Arc::new(crate::live::Hub::default()), store.backend, 0, head.clone()));
    let consumers = projector::Consumers::new(
        store.clone(),
        crate::consumers::groups(&store),
        head,
        feed.clone(),
        projector::Tuning {
            poll: Duration::from_millis(200),
            write_behind: Duration::from_millis(crate::config::WRITE_BEHIND_MS),
            park_after: crate::config::PARK_AFTER,
        },
    );
    let mut tasks = consumers.run(shutdown.clone());
    if store.backend == store::Backend::Postgres {
        let url = store::normalize_url(&args.db.database_url);
        tasks.push(tokio::spawn(crate::notices::listen(url, store.clone(), feed, None, shutdown.clone())));
    }
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let style = ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
        .context("progress bar template")?
        .progress_chars("=> ");

    let bar = ProgressBar::new(args.members).with_style(style.clone()).with_message("members");
    let ids: Vec<String> = (0..args.members).map(|i| format!("seed-{run_id}-{i}")).collect();
    let refused = drive(
        &bus,
        &bar,
        ids.iter().enumerate().map(|(i, id)| {
            let name = format!("{} {}", FIRST[i % FIRST.len()], LAST[(i / FIRST.len()) % LAST.len()]);
            let email = format!("{}.{i}.{run_id}@example.com", name.to_lowercase().replace(' ', "."));
            Command::Member { member_id: id.clone(), action: MemberAction::Enroll { name, email, account: None } }
        }),
    )
    .await;
    bar.finish();

    let bar = ProgressBar::new(args.purchases).with_style(style).with_message("purchases");
    let purchases: Vec<Command> = {
        let mut rng = rand::rng();
        (0..args.purchases)
            .map(|i| {
                // One in ten purchases is anonymous: it earns nothing but is still closed.
                let member_id = (!ids.is_empty() && rng.random_range(0..10) != 0)
                    .then(|| ids[rng.random_range(0..ids.len())].clone());
                Command::RecordPurchase(Purchase {
                    transaction_id: format!("seed-{run_id}-t{i}"),
                    member_id,
                    amount_cents: rng.random_range(100..25_000),
                    currency: "EUR".into(),
                    channel: if rng.random_bool(0.5) { Channel::Pos } else { Channel::Ecommerce },
                    performed_at: clock::now(),
                })
            })
            .collect()
    };
    let refused = refused + drive(&bus, &bar, purchases.into_iter()).await;
    bar.finish();

    let spinner = ProgressBar::new_spinner().with_message("projecting views and rewarding purchases…");
    spinner.enable_steady_tick(Duration::from_millis(120));
    consumers.catch_up(Duration::from_secs(3600)).await?;
    spinner.finish_with_message("views are up to date");
    shutdown.cancel();
    drop(bus);
    let _ = writer.await;
    for task in tasks {
        let _ = task.await;
    }
    if refused > 0 {
        anyhow::bail!("{refused} seed commands were refused (see the log)");
    }
    println!("seeded {} members and {} purchases", args.members, args.purchases);
    Ok(())
}

/// Send commands 256 at a time (the bus commits them in groups); count refusals.
async fn drive(bus: &CommandBus, bar: &ProgressBar, commands: impl Iterator<Item = Command>) -> u64 {
    futures::stream::iter(commands)
        .map(|c| async move { bus.send(envelope(c)).await })
        .buffer_unordered(256)
        .fold(0u64, |refused, result| async move {
            bar.inc(1);
            match result {
                Ok(_) => refused,
                Err(err) => {
                    tracing::warn!(error = %err, "seed command refused");
                    refused + 1
                }
            }
        })
        .await
}

/// The demo members `serve --demo` creates when the store is empty.
pub const DEMO_MEMBERS: [(&str, &str, &str); 3] = [
    ("ada", "Ada Lovelace", "ada@example.com"),
    ("grace", "Grace Hopper", "grace@example.com"),
    ("alan", "Alan Turing", "alan@example.com"),
];

pub async fn demo_if_empty(state: &AppState) -> anyhow::Result<()> {
    if state.store.head().await? > 0 {
        return Ok(());
    }
    let send = |command| state.bus.send(envelope(command));
    for (id, name, email) in DEMO_MEMBERS {
        let member_id = id.to_string();
        send(Command::Member {
            member_id,
            action: MemberAction::Enroll { name: name.into(), email: email.into(), account: None },
        })
        .await?;
    }
    let earn = |id: &str, points, reason: &str| Command::Member {
        member_id: id.into(),
        action: MemberAction::Earn { points, reason: Some(reason.into()) },
    };
    send(earn("ada", 850, "Welcome bonus")).await?;
    send(earn("grace", 4_200, "Welcome bonus")).await?;
    send(earn("alan", 19_500, "Welcome bonus")).await?;
    send(Command::Member {
        member_id: "grace".into(),
        action: MemberAction::Redeem { points: 300, reward: Some("Coffee mug".into()) },
    })
    .await?;
    send(Command::RecordPurchase(Purchase {
        transaction_id: "demo-1".into(),
        member_id: Some("ada".into()),
        amount_cents: 4_999,
        currency: "EUR".into(),
        channel: Channel::Ecommerce,
        performed_at: clock::now(),
    }))
    .await?;
    tracing::info!("seeded demo members: open /members/ada or /admin");
    Ok(())
}

/// People accounts `serve --demo` creates, beside the demo members' own accounts.
pub const DEMO_PEOPLE: [(&str, &str, &str); 2] =
    [("staff@tally.example", "Sam Staff", "staff"), ("admin@tally.example", "Ada Admin", "admin")];

/// `serve --demo`: give the demo members and two demo people (staff, admin) accounts with new
/// random passwords, and print them. New passwords at every start: nothing guessable is ever
/// left on a server, and the log of this start is the only place they are written.
pub async fn demo_accounts(state: &AppState) -> anyhow::Result<()> {
    let auth = &state.auth;
    let mut lines = Vec::new();
    for (member_id, _, email) in DEMO_MEMBERS {
        let password = crate::auth::secret::random(12);
        let hash = auth.passwords.hash(&password).await?;
        let mut conn = state.store.write.acquire().await?;
        let account = crate::auth::accounts::set_member_password(&mut conn, member_id, &hash, "system").await?;
        drop(conn);
        auth.accounts.forget(&account);
        lines.push(format!("  member {email:<22} password {password}   (/members/{member_id})"));
    }
    for (email, name, role) in DEMO_PEOPLE {
        let password = crate::auth::secret::random(12);
        let hash = auth.passwords.hash(&password).await?;
        let existing = auth.accounts.for_sign_in(email).await?.into_iter().find(|a| a.member_id.is_none());
        let id = match existing {
            Some(account) => account.id,
            None => auth.accounts.create_person(email, name, role, "system").await?.id,
        };
        auth.accounts.set_password(&id, &hash).await?;
        lines.push(format!("  {role:<6} {email:<22} password {password}   (/admin)"));
    }
    println!("\ndemo sign-in (new passwords at every start with --demo):\n{}\n", lines.join("\n"));
    Ok(())
}
