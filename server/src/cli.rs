//! `tally keys create` and `tally users create`: identity on the database directly, for the
//! first admin (no one can sign in before there is one) and for scripts.

use crate::auth::accounts::Accounts;
use crate::auth::keys::Keys;
use crate::auth::links::{self, LinkFor};
use crate::config::{DatabaseArgs, KeyCreateArgs, UserCreateArgs};
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
