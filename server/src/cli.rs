//! `tally keys create` and `tally users create`: identity on the database directly, for the
//! first admin (no one can sign in before there is one) and for scripts. `tally rebuild --online`:
//! a client of a running server's API. `tally cdc`: change data capture outside the server.

use crate::auth::accounts::Accounts;
use crate::auth::keys::Keys;
use crate::auth::links::{self, LinkFor};
use crate::config::{CdcAction, CdcArgs, DatabaseArgs, KeyCreateArgs, RebuildArgs, UserCreateArgs};
use crate::store::{PoolSizes, Store};
use anyhow::Context;

async fn open(db: &DatabaseArgs) -> anyhow::Result<Store> {
    Store::open(&db.database_url, &PoolSizes { read: 1, write: 1 }, db.durable)
        .await
        .context("opening the database (on SQLite, stop the server that holds the file first)")
}

/// `tally keys create --name N --role R`: the token goes alone on the last line, for scripts.
pub async fn create_key(args: &KeyCreateArgs) -> anyhow::Result<()> {
    let store = open(&args.db).await?;
    let keys = Keys::new(store.clone(), false);
    let (key, token) = keys.create(&args.name, &args.role, "system").await?;
    eprintln!("created key {} ({}, role {}); its token is shown this once:", key.id, key.name, key.role.as_str());
    println!("{token}");
    store.write.close().await;
    Ok(())
}

/// `tally users create --email E --name N --role R`: the account, and a link to set its password.
pub async fn create_user(args: &UserCreateArgs) -> anyhow::Result<()> {
    let store = open(&args.db).await?;
    let accounts = Accounts::new(store.clone(), false);
    let person = accounts.create_person(&args.email, &args.name, &args.role, "system").await?;
    let link = links::issue(&store, &LinkFor::Account(person.id.clone()), "system").await?;
    let base = args.public_url.trim().trim_end_matches('/');
    println!(
        "created {} {} ({}). Their access link, valid once until {}:\n{base}{}",
        person.role.as_str(),
        person.email,
        person.id,
        link.expires_at,
        link.url
    );
    store.write.close().await;
    Ok(())
}

/// `tally rebuild --online`: ask the server at `--url` for a blue/green rebuild of each projection
/// in turn, and draw its progress until it is swapped in (or fails: then the exit status is 1).
pub async fn rebuild_online(args: &RebuildArgs) -> anyhow::Result<()> {
    use indicatif::{ProgressBar, ProgressStyle};
    let token = args.api_key.as_deref().context("--online needs an admin key: --api-key or TALLY_API_KEY")?;
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30)).build()?;
    let base = args.url.trim_end_matches('/');
    let projections = match args.projections.is_empty() {
        true => crate::projector::blue_green::REBUILDABLE.iter().map(|p| p.to_string()).collect(),
        false => args.projections.clone(),
    };
    let style =
        ProgressStyle::with_template("{prefix:>16} {msg:>12} [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})")
            .context("progress bar template")?
            .progress_chars("=> ");
    for name in projections {
        let url = format!("{base}/api/projections/{name}/rebuild");
        let answer =
            client.post(&url).bearer_auth(token).send().await.with_context(|| format!("cannot reach {base}"))?;
        if answer.status() != reqwest::StatusCode::ACCEPTED {
            let status = answer.status();
            anyhow::bail!("{name}: the server answered {status}: {}", answer.text().await.unwrap_or_default());
        }
        let asked: app::views::RebuildStatus = answer.json().await?;
        let bar = ProgressBar::new(asked.total.max(1)).with_style(style.clone()).with_prefix(name.clone());
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            let answer = client.get(&url).bearer_auth(token).send().await?.error_for_status()?;
            let build: app::views::RebuildStatus = answer.json().await?;
            if build.id != asked.id {
                anyhow::bail!("{name}: another rebuild (#{}) took this one's place", build.id);
            }
            bar.set_length(build.total.max(1));
            bar.set_position(build.applied);
            bar.set_message(build.phase.clone().unwrap_or_else(|| build.state.clone()));
            match build.state.as_str() {
                "swapped" => {
                    bar.finish_with_message("swapped");
                    println!(
                        "{name}: rebuilt from {} events and swapped in at position {}",
                        build.applied,
                        build.position.unwrap_or(0)
                    );
                    break;
                }
                "failed" => {
                    bar.abandon_with_message("failed");
                    anyhow::bail!("{name}: the rebuild failed: {}", build.error.unwrap_or_default());
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// `tally cdc`: read the configuration's PostgreSQL sources into the event store until ctrl-c or
/// SIGTERM (the consumers of a running server, or the next one started, apply what is appended);
/// `tally cdc drop-slot --source S`: remove S's slot.
pub async fn cdc(args: &CdcArgs) -> anyhow::Result<()> {
    use crate::cdc::{config::CdcConfig, slot, status::CdcStatus};
    let path = args.config.as_deref().context("give the CDC configuration: --config cdc.toml (or TALLY_CDC_CONFIG)")?;
    let config = CdcConfig::load(path)?;
    let sources: Vec<_> = config
        .sources
        .iter()
        .filter(|s| args.source.as_ref().is_none_or(|name| &s.name == name))
        .filter(|s| s.postgres_url.is_some())
        .cloned()
        .collect();
    if let Some(name) = &args.source {
        anyhow::ensure!(!sources.is_empty(), "no PostgreSQL source '{name}' in {}", path.display());
    }
    if let Some(CdcAction::DropSlot) = args.action {
        let name = args.source.as_deref().context("drop-slot needs --source")?;
        let source = &sources[0];
        match slot::drop_slot(source).await? {
            true => println!("dropped the slot {} of source {name}", source.slot_name()),
            false => println!("source {name} has no slot {}", source.slot_name()),
        }
        return Ok(());
    }
    anyhow::ensure!(!sources.is_empty(), "{} has no PostgreSQL source (postgres_url) to read", path.display());
    let store = Store::open(&args.db.database_url, &PoolSizes { read: 1, write: 1 }, args.db.durable).await.context(
        "opening the event store (on SQLite, stop the server that holds the file, or give it --cdc-config instead)",
    )?;
    let head = std::sync::Arc::new(tokio::sync::watch::Sender::new(store.head().await?));
    let (bus, writer) = crate::commands::CommandBus::start(store.clone(), head);
    let status = std::sync::Arc::new(CdcStatus::new(&sources, store.health.clone()));
    let stop = tokio_util::sync::CancellationToken::new();
    let readers: Vec<_> =
        sources.into_iter().map(|s| tokio::spawn(slot::read(bus.clone(), status.clone(), s, stop.clone()))).collect();
    crate::shutdown_on_signal(stop.clone()).await;
    for reader in readers {
        let _ = reader.await;
    }
    drop(bus);
    let _ = writer.await;
    store.write.close().await;
    Ok(())
}
