//! Debezium change events, as Debezium Server's HTTP sink or Kafka Connect's HTTP sink posts them
//! to `POST /api/cdc/{source}`: one event, or an array of them; each either the bare envelope or
//! wrapped with its schema (`{"schema": …, "payload": envelope}`).
//!
//! ```json
//! {"before": null, "after": {"id": 7, "name": "Ann", …}, "op": "c",
//!  "source": {"connector": "mysql", "db": "crm", "table": "customers", "file": "binlog.000003", "pos": 154, "row": 0, "ts_ms": 1765100000000}}
//! ```
//!
//! The change's position is made of the source's own position fields, whichever the connector
//! sends (PostgreSQL `lsn`; MySQL `file`, `pos`, `row`; SQL Server `commit_lsn`, `change_lsn`,
//! `event_serial_no`; Oracle `scn`, `commit_scn`…). A snapshot read (`op` `r`) shares the
//! snapshot's position with every other row, so the row's id is added to it.

use super::config::{qualified, SourceConfig};
use super::mapping::{Change, Op, Row};
use serde_json::Value;

/// The `source` fields that place a change in its source's log, in the order they are joined.
const POSITION_FIELDS: &[&str] = &[
    "lsn",
    "commit_lsn",
    "change_lsn",
    "event_serial_no",
    "file",
    "pos",
    "row",
    "gtid",
    "scn",
    "commit_scn",
    "rs_id",
    "ssn",
    "sequence",
];

/// The changes in `body` (an event or an array of events), or why it is not one: then nothing is
/// applied. Tombstones (`null`), truncates and messages carry no row and are left out.
pub fn parse(source: &SourceConfig, body: &Value) -> Result<Vec<Change>, String> {
    let events = match body {
        Value::Array(events) => events.iter().collect::<Vec<_>>(),
        event => vec![event],
    };
    let mut changes = Vec::with_capacity(events.len());
    for (i, event) in events.into_iter().enumerate() {
        let at = |e: String| if matches!(body, Value::Array(_)) { format!("event {i}: {e}") } else { e };
        if let Some(change) = event_change(source, event).map_err(at)? {
            changes.push(change);
        }
    }
    Ok(changes)
}

fn event_change(source: &SourceConfig, event: &Value) -> Result<Option<Change>, String> {
    let envelope = match event.get("payload") {
        Some(payload) if event.get("schema").is_some() => payload,
        _ => event,
    };
    if envelope.is_null() {
        return Ok(None);
    }
    let Some(envelope) = envelope.as_object() else {
        return Err("an event must be a JSON object".into());
    };
    let op = match envelope.get("op").and_then(Value::as_str) {
        Some("c") => Op::Insert,
        Some("u") => Op::Update,
        Some("d") => Op::Delete,
        Some("r") => Op::Read,
        Some("t" | "m") => return Ok(None),
        Some(other) => return Err(format!("unknown op '{other}' (c, u, d, r, t or m)")),
        None => return Err("the event has no op".into()),
    };
    let src = envelope.get("source").and_then(Value::as_object).ok_or("the event has no source")?;
    let name = |key: &str| src.get(key).and_then(Value::as_str).filter(|s| !s.is_empty());
    let table = name("table").ok_or("source.table is missing")?;
    let table = qualified(&match name("schema").or_else(|| name("db")) {
        Some(schema) => format!("{schema}.{table}"),
        None => table.to_string(),
    });
    let row = |key: &str| -> Result<Option<Row>, String> {
        match envelope.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(row)) => Ok(Some(row.clone().into_iter().collect())),
            Some(_) => Err(format!("{key} must be an object or null")),
        }
    };
    let (before, after) = (row("before")?, row("after")?);
    match op {
        Op::Insert | Op::Read | Op::Update if after.is_none() => return Err("the event has no after".into()),
        Op::Delete if before.is_none() => return Err("a delete has no before".into()),
        _ => {}
    }
    let fields: Vec<String> = POSITION_FIELDS
        .iter()
        .filter_map(|key| match src.get(*key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(format!("{key}={s}")),
            Some(other) => Some(format!("{key}={other}")),
        })
        .collect();
    if fields.is_empty() {
        return Err(format!("source has none of the position fields ({})", POSITION_FIELDS.join(", ")));
    }
    let mut position = fields.join(",");
    // Debezium marks snapshot rows `"snapshot": "true"` (or `"first"`, `"last"`…), or `true`.
    let snapshot = op == Op::Read
        || match src.get("snapshot") {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => s != "false",
            _ => false,
        };
    if snapshot {
        position.push_str(&format!("|{table}|{}", row_id(source, &table, after.as_ref().or(before.as_ref()))));
    }
    let committed_at =
        src.get("ts_ms").and_then(Value::as_i64).and_then(chrono::DateTime::<chrono::Utc>::from_timestamp_millis);
    Ok(Some(Change { table, op, before, after, position, committed_at }))
}

/// The mapped id of a row, to tell a snapshot's rows apart.
fn row_id(source: &SourceConfig, table: &str, row: Option<&Row>) -> String {
    let id_column = match (&source.customers, &source.orders) {
        (Some(c), _) if qualified(&c.table) == table => c.id.as_str(),
        (_, Some(o)) if qualified(&o.table) == table => o.id.as_str(),
        _ => "id",
    };
    row.and_then(|r| r.get(id_column)).map(|v| v.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::config::CdcConfig;
    use serde_json::json;

    fn source() -> SourceConfig {
        let text = "[[source]]\nname = \"shop\"\n[source.customers]\ntable = \"shop.customers\"\nname = \"name\"\nemail = \"email\"\n";
        CdcConfig::parse(text).expect("config").sources.remove(0)
    }

    #[test]
    fn a_wrapped_mysql_insert_and_a_bare_delete() {
        let wrapped = json!({"schema": {}, "payload": {"before": null, "after": {"id": 1, "name": "A", "email": "a@x.io"}, "op": "c",
            "source": {"connector": "mysql", "db": "shop", "table": "customers", "file": "binlog.000003", "pos": 154, "row": 0, "ts_ms": 1765100000000i64}}});
        let changes = parse(&source(), &wrapped).expect("parses");
        assert_eq!(changes[0].table, "shop.customers");
        assert_eq!(changes[0].position, "file=binlog.000003,pos=154,row=0");
        assert_eq!(changes[0].committed_at.map(|t| t.timestamp_millis()), Some(1765100000000));
        let deleted = json!([{"before": {"id": 1}, "after": null, "op": "d", "source": {"db": "shop", "table": "customers", "file": "b", "pos": 9, "row": 0}}, null]);
        let changes = parse(&source(), &deleted).expect("parses");
        assert_eq!((changes.len(), changes[0].op), (1, Op::Delete));
    }

    #[test]
    fn snapshot_rows_that_share_a_position_are_told_apart_by_their_id() {
        let read = |id: i64| {
            json!({"after": {"id": id, "name": "A", "email": "a@x.io"}, "op": "r",
            "source": {"connector": "postgresql", "schema": "shop", "table": "customers", "lsn": 24023128, "snapshot": "true"}})
        };
        let changes = parse(&source(), &json!([read(1), read(2)])).expect("parses");
        assert_ne!(changes[0].position, changes[1].position);
        assert!(changes[0].position.starts_with("lsn=24023128|shop.customers|1"), "{}", changes[0].position);
    }

    #[test]
    fn what_is_not_an_event_is_refused_with_its_place() {
        let no_position = json!([{"after": {"id": 1}, "op": "c", "source": {"table": "customers"}}]);
        assert!(parse(&source(), &no_position).is_err_and(|e| e.starts_with("event 0") && e.contains("position")));
        assert!(parse(&source(), &json!({"op": "x", "source": {}})).is_err_and(|e| e.contains("unknown op")));
        assert!(parse(&source(), &json!({"op": "u", "source": {"table": "t", "lsn": 1}}))
            .is_err_and(|e| e.contains("after")));
        assert!(parse(&source(), &json!({"op": "t", "source": {"table": "t"}})).is_ok_and(|c| c.is_empty()));
    }
}
