//! A source's row change → Tally's commands, by the source's configuration. Pure: the same change
//! always maps to the same commands, so a change read again (after a crash, or an envelope sent
//! twice) is recognised by its idempotency keys.

use super::config::{qualified, CustomersTable, OnDelete, OrdersTable, SourceConfig};
use crate::commands::{Command, MemberAction};
use crate::http::commands::{enroll_command, profile_command, purchase_command, EnrollBody, ProfileBody, PurchaseBody};
use serde_json::Value;
use std::collections::BTreeMap;

/// A row as column → value (text, number, boolean or null).
pub type Row = BTreeMap<String, Value>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
    /// A snapshot read of an existing row (Debezium `r`): mapped as an insert.
    Read,
}

/// One row change, whatever it came from (a replication slot, a Debezium envelope).
#[derive(Debug, Clone)]
pub struct Change {
    /// `schema.table`, lower case.
    pub table: String,
    pub op: Op,
    pub before: Option<Row>,
    pub after: Option<Row>,
    /// Where the change is in the source, unique within it (see `cdc::slot` and `cdc::debezium`).
    pub position: String,
    /// When the source committed it, when known.
    pub committed_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// What a change becomes.
#[derive(Debug)]
pub enum Mapped {
    /// Commands to run, in order. Empty: nothing Tally keeps changed.
    Commands(Vec<Command>),
    /// The change cannot be made a command (a missing column, an invalid email): nothing is
    /// appended; the reason is reported as the source's last error.
    Invalid(String),
}

/// Map `change` by `source`'s tables; a table it does not map gives no commands.
pub fn map(source: &SourceConfig, change: &Change) -> Mapped {
    let result = match (&source.customers, &source.orders) {
        (Some(customers), _) if qualified(&customers.table) == change.table => customer(customers, change),
        (_, Some(orders)) if qualified(&orders.table) == change.table => {
            order(orders, source.customers.as_ref().map_or("{}", |c| c.member_id.as_str()), change)
        }
        _ => Ok(Vec::new()),
    };
    match result {
        Ok(commands) => Mapped::Commands(commands),
        Err(reason) => {
            Mapped::Invalid(format!("{} {} at {}: {reason}", change.table, op_name(change.op), change.position))
        }
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Insert => "insert",
        Op::Update => "update",
        Op::Delete => "delete",
        Op::Read => "snapshot read",
    }
}

/// A value as the text a command takes (numbers and booleans as written).
fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn column(row: &Row, name: &str) -> Result<Option<String>, String> {
    match row.get(name) {
        None => Err(format!("the row has no column '{name}'")),
        Some(value) => Ok(text(value)),
    }
}

fn required(row: &Row, name: &str) -> Result<String, String> {
    column(row, name)?.ok_or_else(|| format!("column '{name}' is null"))
}

fn template(pattern: &str, id: &str) -> String {
    pattern.replace("{}", id)
}

fn customer(table: &CustomersTable, change: &Change) -> Result<Vec<Command>, String> {
    let row = change.after.as_ref().or(change.before.as_ref()).ok_or("the change carries no row")?;
    let member_id = template(&table.member_id, &required(row, &table.id)?);
    let suspended = |row: &Row| -> Result<bool, String> {
        match &table.status {
            None => Ok(false),
            Some(status) => Ok(column(row, status)?.is_some_and(|v| table.suspended.iter().any(|s| s == &v))),
        }
    };
    let suspend = |why: String| Command::Member {
        member_id: member_id.clone(),
        action: MemberAction::Suspend { reason: Some(why) },
    };
    let mut commands = Vec::new();
    match change.op {
        Op::Insert | Op::Read => {
            let body = EnrollBody {
                name: required(row, &table.name)?,
                email: required(row, &table.email)?,
                member_id: Some(member_id.clone()),
            };
            commands.push(enroll_command(body, None).map_err(|e| e.to_string())?);
            if suspended(row)? {
                commands.push(suspend(status_reason(table, row)));
            }
        }
        Op::Update => {
            let after = change.after.as_ref().ok_or("an update without the new row")?;
            let changed = |col: &str| -> Result<Option<String>, String> {
                let new = required(after, col)?;
                match &change.before {
                    Some(before) if column(before, col)?.as_deref() == Some(new.as_str()) => Ok(None),
                    _ => Ok(Some(new)),
                }
            };
            let profile = ProfileBody { name: changed(&table.name)?, email: changed(&table.email)? };
            if profile.name.is_some() || profile.email.is_some() {
                commands.push(profile_command(&member_id, profile).map_err(|e| e.to_string())?);
            }
            let now = suspended(after)?;
            // Without the old row (REPLICA IDENTITY DEFAULT, a Debezium envelope without
            // `before`) the status is applied as it is now; the member's rules refuse what is so
            // already.
            let was = match &change.before {
                Some(before) if table.status.as_ref().is_some_and(|s| before.contains_key(s)) => {
                    Some(suspended(before)?)
                }
                _ => None,
            };
            if table.status.is_some() && was != Some(now) {
                commands.push(match now {
                    true => suspend(status_reason(table, after)),
                    false => Command::Member { member_id: member_id.clone(), action: MemberAction::Reactivate },
                });
            }
        }
        Op::Delete => {
            if table.on_delete == OnDelete::Suspend {
                commands.push(suspend("deleted in the customer system".into()));
            }
        }
    }
    Ok(commands)
}

fn status_reason(table: &CustomersTable, row: &Row) -> String {
    let status = table.status.as_deref().and_then(|s| column(row, s).ok().flatten()).unwrap_or_default();
    format!("status '{status}' in the customer system")
}

fn order(table: &OrdersTable, member_pattern: &str, change: &Change) -> Result<Vec<Command>, String> {
    // A sale is a fact: an order changed or deleted later does not take its points back.
    if !matches!(change.op, Op::Insert | Op::Read) {
        return Ok(Vec::new());
    }
    let row = change.after.as_ref().ok_or("an insert without its row")?;
    let member_id = match &table.customer {
        Some(col) => column(row, col)?.map(|id| template(member_pattern, &id)),
        None => None,
    };
    let amount_cents = match (&table.amount_cents, &table.amount) {
        (Some(col), _) => {
            let raw = required(row, col)?;
            raw.parse::<i64>().map_err(|_| format!("column '{col}' is not whole cents: '{raw}'"))?
        }
        (None, Some(col)) => cents(&required(row, col)?).ok_or_else(|| format!("column '{col}' is not an amount"))?,
        (None, None) => return Err("no amount column is configured".into()),
    };
    let currency = match &table.currency {
        Some(col) => required(row, col)?,
        None => table.default_currency.clone(),
    };
    let body = PurchaseBody {
        transaction_id: Some(template(&table.transaction_id, &required(row, &table.id)?)),
        member_id,
        amount_cents,
        currency,
        channel: table.channel.clone(),
    };
    let performed_at =
        change.committed_at.map_or_else(crate::clock::now, |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    Ok(vec![purchase_command(body, performed_at).map_err(|e| e.to_string())?])
}

/// A decimal amount (`12.5`, `12.50`, `-3`) in cents, exactly; more than two decimals that are
/// not zeros is not an amount.
fn cents(raw: &str) -> Option<i64> {
    let raw = raw.trim();
    let (whole, fraction) = raw.split_once('.').unwrap_or((raw, ""));
    let fraction = fraction.trim_end_matches('0');
    if fraction.len() > 2 || !fraction.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let negative = whole.starts_with('-');
    let units: i64 = whole.trim_start_matches('-').parse().ok()?;
    let hundredths: i64 = format!("{fraction:0<2}").parse().ok()?;
    let value = units.checked_mul(100)?.checked_add(hundredths)?;
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::config::CdcConfig;
    use serde_json::json;

    fn source() -> SourceConfig {
        let text = r#"
            [[source]]
            name = "crm"
            [source.customers]
            table = "customers"
            member_id = "crm-{}"
            name = "full_name"
            email = "email"
            status = "status"
            suspended = ["blocked"]
            [source.orders]
            table = "public.orders"
            transaction_id = "order-{}"
            customer = "customer_id"
            amount = "total"
        "#;
        CdcConfig::parse(text).expect("config").sources.remove(0)
    }

    fn row(value: Value) -> Row {
        serde_json::from_value(value).expect("an object")
    }

    fn change(table: &str, op: Op, before: Option<Value>, after: Option<Value>) -> Change {
        Change {
            table: table.into(),
            op,
            before: before.map(row),
            after: after.map(row),
            position: "0/1:0".into(),
            committed_at: None,
        }
    }

    fn commands(mapped: Mapped) -> Vec<Command> {
        match mapped {
            Mapped::Commands(commands) => commands,
            Mapped::Invalid(reason) => panic!("invalid: {reason}"),
        }
    }

    fn ann(status: &str, name: &str) -> Value {
        json!({"id": 7, "full_name": name, "email": "ann@example.com", "status": status})
    }

    #[test]
    fn an_inserted_customer_is_enrolled_and_a_blocked_one_suspended_too() {
        let enrolled =
            commands(map(&source(), &change("public.customers", Op::Insert, None, Some(ann("active", "Ann")))));
        assert!(matches!(&enrolled[..], [Command::Member { member_id, action: MemberAction::Enroll { name, .. } }]
            if member_id == "crm-7" && name == "Ann"));
        let blocked =
            commands(map(&source(), &change("public.customers", Op::Read, None, Some(ann("blocked", "Ann")))));
        assert!(matches!(&blocked[..], [_, Command::Member { action: MemberAction::Suspend { .. }, .. }]));
    }

    #[test]
    fn an_update_maps_only_what_changed_and_nothing_when_nothing_mapped_did() {
        let s = source();
        let renamed = commands(map(
            &s,
            &change("public.customers", Op::Update, Some(ann("active", "Ann")), Some(ann("active", "Anne"))),
        ));
        assert!(
            matches!(&renamed[..], [Command::Member { action: MemberAction::UpdateProfile { name: Some(n), email: None }, .. }] if n == "Anne")
        );
        let mut other = ann("active", "Ann");
        other["phone"] = json!("555");
        let unmapped =
            commands(map(&s, &change("public.customers", Op::Update, Some(ann("active", "Ann")), Some(other))));
        assert!(unmapped.is_empty(), "{unmapped:?}");
        let blocked = commands(map(
            &s,
            &change("public.customers", Op::Update, Some(ann("active", "Ann")), Some(ann("blocked", "Ann"))),
        ));
        assert!(matches!(&blocked[..], [Command::Member { action: MemberAction::Suspend { .. }, .. }]));
        let back = commands(map(
            &s,
            &change("public.customers", Op::Update, Some(ann("blocked", "Ann")), Some(ann("active", "Ann"))),
        ));
        assert!(matches!(&back[..], [Command::Member { action: MemberAction::Reactivate, .. }]));
        let deleted = commands(map(&s, &change("public.customers", Op::Delete, Some(json!({"id": 7})), None)));
        assert!(
            matches!(&deleted[..], [Command::Member { action: MemberAction::Suspend { .. }, member_id }] if member_id == "crm-7")
        );
    }

    #[test]
    fn an_order_is_a_purchase_of_the_customers_member() {
        let order = json!({"id": 90, "customer_id": 7, "total": "12.50"});
        let bought = commands(map(&source(), &change("public.orders", Op::Insert, None, Some(order.clone()))));
        let [Command::RecordPurchase(purchase)] = &bought[..] else { panic!("{bought:?}") };
        assert_eq!(
            (purchase.transaction_id.as_str(), purchase.member_id.as_deref(), purchase.amount_cents),
            ("order-90", Some("crm-7"), 1250)
        );
        let changed = commands(map(&source(), &change("public.orders", Op::Update, Some(order.clone()), Some(order))));
        assert!(changed.is_empty());
        let anonymous = commands(map(
            &source(),
            &change("public.orders", Op::Insert, None, Some(json!({"id": 91, "customer_id": null, "total": 3}))),
        ));
        assert!(
            matches!(&anonymous[..], [Command::RecordPurchase(p)] if p.member_id.is_none() && p.amount_cents == 300)
        );
    }

    #[test]
    fn a_change_that_cannot_be_a_command_says_why() {
        let bad = map(
            &source(),
            &change(
                "public.customers",
                Op::Insert,
                None,
                Some(json!({"id": 8, "full_name": "B", "email": "nope", "status": "active"})),
            ),
        );
        assert!(matches!(&bad, Mapped::Invalid(reason) if reason.contains("nope")), "{bad:?}");
        let missing =
            map(&source(), &change("public.orders", Op::Insert, None, Some(json!({"id": 1, "customer_id": 7}))));
        assert!(matches!(&missing, Mapped::Invalid(reason) if reason.contains("total")), "{missing:?}");
        let elsewhere = commands(map(&source(), &change("public.audit_log", Op::Insert, None, Some(json!({"id": 1})))));
        assert!(elsewhere.is_empty());
    }

    #[test]
    fn decimal_amounts_become_exact_cents() {
        assert_eq!(cents("12.5"), Some(1250));
        assert_eq!(cents("12.50"), Some(1250));
        assert_eq!(cents("0.07"), Some(7));
        assert_eq!(cents("3"), Some(300));
        assert_eq!(cents("1.005"), None);
        assert_eq!(cents("1.2.3"), None);
        assert_eq!(cents("abc"), None);
    }
}
