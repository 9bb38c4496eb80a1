//! Reading the text PostgreSQL's `test_decoding` output plugin writes for each change:
//!
//! ```text
//! BEGIN 741
//! table public.customers: INSERT: id[integer]:7 name[text]:'Ann O''Neil' email[text]:'ann@example.com'
//! table public.customers: UPDATE: old-key: id[integer]:7 name[text]:'Ann' … new-tuple: id[integer]:7 name[text]:'Anne' …
//! table public.customers: DELETE: id[integer]:7
//! COMMIT 741 (at 2026-12-07 10:00:00.123456+00)
//! ```
//!
//! (`old-key:` holds the whole old row under `REPLICA IDENTITY FULL`, only the key otherwise, and
//! is left out of an update that did not change the key.)

use super::mapping::{Op, Row};
use serde_json::Value;

/// One line of the plugin's output.
#[derive(Debug, PartialEq)]
pub enum Line {
    Begin,
    Commit {
        committed_at: Option<chrono::DateTime<chrono::Utc>>,
    },
    Change {
        table: String,
        op: Op,
        before: Option<Row>,
        after: Option<Row>,
    },
    /// `TRUNCATE` and messages: nothing a row change maps from.
    Other(String),
}

pub fn parse(line: &str) -> Result<Line, String> {
    if line == "BEGIN" || line.starts_with("BEGIN ") {
        return Ok(Line::Begin);
    }
    if line == "COMMIT" || line.starts_with("COMMIT ") {
        let committed_at = line
            .split_once("(at ")
            .and_then(|(_, at)| at.strip_suffix(')'))
            .and_then(|at| chrono::DateTime::parse_from_str(at, "%Y-%m-%d %H:%M:%S%.f%#z").ok())
            .map(|at| at.with_timezone(&chrono::Utc));
        return Ok(Line::Commit { committed_at });
    }
    let Some(rest) = line.strip_prefix("table ") else {
        return Ok(Line::Other(line.to_string()));
    };
    for (marker, op) in [(": INSERT:", Op::Insert), (": UPDATE:", Op::Update), (": DELETE:", Op::Delete)] {
        if let Some(at) = rest.find(marker) {
            let table = unquote_table(&rest[..at]);
            let columns = rest[at + marker.len()..].trim_start();
            return change(table, op, columns);
        }
    }
    Ok(Line::Other(line.to_string()))
}

fn change(table: String, op: Op, columns: &str) -> Result<Line, String> {
    if columns.starts_with("(no-tuple-data)") {
        return Ok(Line::Change { table, op, before: None, after: None });
    }
    let (before, after) = match op {
        Op::Insert | Op::Read => (None, Some(row(columns)?)),
        Op::Delete => (Some(row(columns)?), None),
        Op::Update => match columns.strip_prefix("old-key: ") {
            Some(both) => {
                let at = find_marker(both, " new-tuple: ").ok_or("an update's old-key without its new-tuple")?;
                (Some(row(&both[..at])?), Some(row(&both[at + " new-tuple: ".len()..])?))
            }
            None => (None, Some(row(columns)?)),
        },
    };
    Ok(Line::Change { table, op, before, after })
}

/// `public."Order Lines"` → `public.order lines`: the plugin quotes names that need it.
fn unquote_table(raw: &str) -> String {
    raw.replace('"', "").to_lowercase()
}

/// Where `marker` starts outside any quoted value.
fn find_marker(text: &str, marker: &str) -> Option<usize> {
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        if c == '\'' {
            quoted = !quoted; // a doubled quote flips twice
        } else if !quoted && text[i..].starts_with(marker) {
            return Some(i);
        }
    }
    None
}

/// `id[integer]:7 name[text]:'Ann'` → {id: 7, name: "Ann"}.
fn row(text: &str) -> Result<Row, String> {
    let mut row = Row::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (name, after_name) = column_name(rest)?;
        let after_type = skip_type(after_name)?;
        let value_text = after_type.strip_prefix(':').ok_or_else(|| format!("no ':' after column {name}'s type"))?;
        let (value, remaining) = value(value_text)?;
        row.insert(name, value);
        rest = remaining.trim_start();
    }
    Ok(row)
}

fn column_name(text: &str) -> Result<(String, &str), String> {
    if let Some(quoted) = text.strip_prefix('"') {
        return unquote(quoted, '"').ok_or_else(|| "an unterminated quoted column name".into());
    }
    let end = text.find('[').ok_or_else(|| format!("no type after a column name in '{text}'"))?;
    Ok((text[..end].to_string(), &text[end..]))
}

/// The text up to the closing `quote` (a doubled one stands for itself), and what follows it.
fn unquote(text: &str, quote: char) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != quote {
            out.push(c);
        } else if chars.peek().is_some_and(|(_, n)| *n == quote) {
            chars.next();
            out.push(quote);
        } else {
            return Some((out, &text[i + c.len_utf8()..]));
        }
    }
    None
}

/// Skip `[character varying]` or `[text[]]`.
fn skip_type(text: &str) -> Result<&str, String> {
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Ok(&text[i + 1..]);
                }
            }
            _ => {}
        }
    }
    Err("an unterminated column type".into())
}

fn value(text: &str) -> Result<(Value, &str), String> {
    if let Some(quoted) = text.strip_prefix('\'') {
        let (value, rest) = unquote(quoted, '\'').ok_or("an unterminated quoted value")?;
        return Ok((Value::String(value), rest));
    }
    let end = text.find(' ').unwrap_or(text.len());
    let (raw, rest) = text.split_at(end);
    let value = match raw {
        "null" => Value::Null,
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        // An unchanged TOASTed value is not sent; it is not a mapped column's new value.
        "unchanged-toast-datum" => Value::Null,
        _ => match raw.parse::<i64>() {
            Ok(n) => Value::from(n),
            // Numerics stay text, so an amount keeps its exact decimals.
            Err(_) => Value::String(raw.to_string()),
        },
    };
    Ok((value, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn as_row(v: Value) -> Row {
        serde_json::from_value(v).expect("object")
    }

    #[test]
    fn an_insert_with_quotes_spaces_and_nulls() {
        let line = "table public.customers: INSERT: id[integer]:7 full_name[character varying]:'Ann O''Neil' email[text]:'a b@x' note[text]:null vip[boolean]:true total[numeric]:12.50";
        assert_eq!(
            parse(line),
            Ok(Line::Change {
                table: "public.customers".into(),
                op: Op::Insert,
                before: None,
                after: Some(as_row(
                    json!({"id": 7, "full_name": "Ann O'Neil", "email": "a b@x", "note": null, "vip": true, "total": "12.50"})
                )),
            })
        );
    }

    #[test]
    fn an_update_with_its_old_row_and_a_delete_with_its_key() {
        let line = "table public.customers: UPDATE: old-key: id[integer]:7 name[text]:'new-tuple: no' new-tuple: id[integer]:7 name[text]:'Anne'";
        let Ok(Line::Change { op: Op::Update, before, after, .. }) = parse(line) else { panic!("{:?}", parse(line)) };
        assert_eq!(before, Some(as_row(json!({"id": 7, "name": "new-tuple: no"}))));
        assert_eq!(after, Some(as_row(json!({"id": 7, "name": "Anne"}))));
        let plain = parse("table public.customers: UPDATE: id[integer]:7 tags[text[]]:'{a,b}'");
        assert!(matches!(plain, Ok(Line::Change { before: None, after: Some(_), .. })), "{plain:?}");
        let deleted = parse("table public.\"Customers\": DELETE: id[integer]:7");
        assert_eq!(
            deleted,
            Ok(Line::Change {
                table: "public.customers".into(),
                op: Op::Delete,
                before: Some(as_row(json!({"id": 7}))),
                after: None
            })
        );
    }

    #[test]
    fn transaction_lines_and_their_commit_time() {
        assert_eq!(parse("BEGIN 741"), Ok(Line::Begin));
        let Ok(Line::Commit { committed_at: Some(at) }) = parse("COMMIT 741 (at 2026-12-07 10:00:00.123456+00)") else {
            panic!("no time")
        };
        assert_eq!(at.to_rfc3339(), "2026-12-07T10:00:00.123456+00:00");
        let Ok(Line::Commit { committed_at: Some(at) }) = parse("COMMIT 9 (at 2026-12-07 12:00:00+02)") else {
            panic!("no zone")
        };
        assert_eq!(at.to_rfc3339(), "2026-12-07T10:00:00+00:00");
        assert!(matches!(parse("table public.orders: TRUNCATE: (no-flags)"), Ok(Line::Other(_))));
        let heartbeat = parse("message: transactional: 0 prefix: tally_heartbeat, sz: 0 content:");
        assert!(matches!(heartbeat, Ok(Line::Other(text)) if text.contains("prefix: tally_heartbeat,")));
        assert!(parse("table public.x: INSERT: id[integer]:'open").is_err());
    }
}
