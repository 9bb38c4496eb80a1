//! The change data capture configuration: a TOML file naming each source, where its changes come
//! from, and how its tables' columns become Tally's commands (docs/cdc.md has a full example).

use anyhow::Context;
use serde::Deserialize;
use std::path::Path;

/// `TALLY_CDC_CONFIG`: every source Tally takes changes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdcConfig {
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceConfig>,
}

/// One system of record.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Names the source in `/api/cdc/{name}`, in events' actor (`cdc:<name>`) and in the slot.
    pub name: String,
    /// The system of record's PostgreSQL database, read through a logical replication slot. Without
    /// it the source only takes Debezium envelopes posted to `/api/cdc/{name}`.
    pub postgres_url: Option<String>,
    /// The replication slot (default `tally_<name>`).
    pub slot: Option<String>,
    /// Whether `tally serve` reads the slot (false: only a `tally cdc` process does).
    #[serde(default = "default_true")]
    pub serve: bool,
    /// How often an idle reader asks the slot for new changes, in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// Changes read from the slot at most per round (whole transactions: a round may hold more).
    #[serde(default = "default_batch_rows")]
    pub batch_rows: u32,
    /// WAL the slot may hold back before `/healthz` and the metric warn, in megabytes.
    #[serde(default = "default_max_retained_wal_mb")]
    pub max_retained_wal_mb: u64,
    /// How far behind the source the reader may fall before the same warning, in seconds.
    #[serde(default = "default_max_lag_secs")]
    pub max_lag_secs: u64,
    pub customers: Option<CustomersTable>,
    pub orders: Option<OrdersTable>,
}

fn default_true() -> bool {
    true
}
fn default_poll_ms() -> u64 {
    10
}
fn default_batch_rows() -> u32 {
    10_000
}
fn default_max_retained_wal_mb() -> u64 {
    1024
}
fn default_max_lag_secs() -> u64 {
    300
}

/// A customers table: a row is a member.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomersTable {
    /// `schema.table` (`public.customers`); a bare name means `public`.
    pub table: String,
    /// The column that identifies the customer.
    #[serde(default = "default_id")]
    pub id: String,
    /// The member id made of the customer's id: `{}` is replaced by it (`crm-{}`).
    #[serde(default = "default_member_id")]
    pub member_id: String,
    pub name: String,
    pub email: String,
    /// A column whose value says whether the customer is suspended.
    pub status: Option<String>,
    /// The values of `status` that mean suspended; any other value means active.
    #[serde(default = "default_suspended")]
    pub suspended: Vec<String>,
    /// What a deleted customer becomes: `suspend` (the default) or `ignore`.
    #[serde(default)]
    pub on_delete: OnDelete,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    #[default]
    Suspend,
    Ignore,
}

/// An orders (sales) table: an inserted row is a purchase (`POST /api/transactions`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrdersTable {
    pub table: String,
    /// The order's id, which becomes the purchase's transaction id through `transaction_id`.
    #[serde(default = "default_id")]
    pub id: String,
    /// The transaction id made of the order's id: `{}` is replaced by it (`shop-{}`).
    #[serde(default = "default_member_id")]
    pub transaction_id: String,
    /// The customer's id (made a member id by the customers table's `member_id`); a null value is
    /// an anonymous sale.
    pub customer: Option<String>,
    /// The amount as whole cents (an integer column)…
    pub amount_cents: Option<String>,
    /// …or as a decimal amount in currency units (`12.50`).
    pub amount: Option<String>,
    /// A column holding the currency code; else `default_currency`.
    pub currency: Option<String>,
    #[serde(default = "default_currency")]
    pub default_currency: String,
    /// `pos` or `ecommerce`.
    #[serde(default = "default_channel")]
    pub channel: String,
}

fn default_id() -> String {
    "id".into()
}
fn default_member_id() -> String {
    "{}".into()
}
fn default_suspended() -> Vec<String> {
    vec!["suspended".into()]
}
fn default_currency() -> String {
    "EUR".into()
}
fn default_channel() -> String {
    "ecommerce".into()
}

impl CdcConfig {
    pub fn load(path: &Path) -> anyhow::Result<CdcConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        CdcConfig::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<CdcConfig> {
        let config: CdcConfig = toml::from_str(text)?;
        let mut names = std::collections::HashSet::new();
        for source in &config.sources {
            source.check()?;
            anyhow::ensure!(names.insert(&source.name), "source '{}' is configured twice", source.name);
        }
        Ok(config)
    }

    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }
}

impl SourceConfig {
    fn check(&self) -> anyhow::Result<()> {
        let name = &self.name;
        anyhow::ensure!(
            !name.is_empty()
                && name.len() <= 40
                && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "source name '{name}': use 1 to 40 lower-case letters, digits or '_'"
        );
        anyhow::ensure!(
            self.customers.is_some() || self.orders.is_some(),
            "source '{name}' maps no table: add [source.customers] or [source.orders]"
        );
        if let Some(orders) = &self.orders {
            anyhow::ensure!(
                orders.amount_cents.is_some() != orders.amount.is_some(),
                "source '{name}': the orders table needs exactly one of amount_cents (whole cents) or amount (a decimal)"
            );
            anyhow::ensure!(
                app::domain::transaction::Channel::parse(&orders.channel).is_some(),
                "source '{name}': channel must be \"pos\" or \"ecommerce\""
            );
            app::domain::validate::currency(&orders.default_currency)
                .map_err(|e| anyhow::anyhow!("source '{name}': default_currency: {e}"))?;
        }
        if let Some(slot) = &self.slot {
            anyhow::ensure!(
                !slot.is_empty()
                    && slot.len() <= 63
                    && slot.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "source '{name}': a slot name is 1 to 63 lower-case letters, digits or '_'"
            );
        }
        anyhow::ensure!(self.batch_rows > 0, "source '{name}': batch_rows must be at least 1");
        Ok(())
    }

    /// The replication slot's name.
    pub fn slot_name(&self) -> String {
        self.slot.clone().unwrap_or_else(|| format!("tally_{}", self.name))
    }

    /// `cdc:<name>`, the actor of every event this source causes (API.md).
    pub fn actor(&self) -> String {
        format!("cdc:{}", self.name)
    }
}

/// `schema.table` with the default schema filled in, lower-cased as PostgreSQL folds unquoted names.
pub fn qualified(table: &str) -> String {
    let table = table.trim().to_lowercase();
    match table.contains('.') {
        true => table,
        false => format!("public.{table}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let config = CdcConfig::parse(include_str!("../../../docs/cdc.example.toml")).expect("example parses");
        let crm = config.source("crm").expect("the crm source");
        assert_eq!(crm.slot_name(), "tally_crm");
        assert_eq!(crm.actor(), "cdc:crm");
        assert!(crm.customers.is_some() && crm.orders.is_some());
    }

    #[test]
    fn mistakes_are_named() {
        let err = CdcConfig::parse("[[source]]\nname = \"Bad Name\"\n[source.orders]\ntable = \"o\"\namount = \"a\"\n")
            .expect_err("bad name");
        assert!(err.to_string().contains("Bad Name"), "{err}");
        let err =
            CdcConfig::parse("[[source]]\nname = \"shop\"\n[source.orders]\ntable = \"o\"\n").expect_err("no amount");
        assert!(err.to_string().contains("amount_cents"), "{err}");
        let err = CdcConfig::parse("[[source]]\nname = \"shop\"\ncolour = 1\n").expect_err("unknown key");
        assert!(err.to_string().contains("colour"), "{err}");
        assert_eq!(qualified("Customers"), "public.customers");
        assert_eq!(qualified("crm.people"), "crm.people");
    }
}
