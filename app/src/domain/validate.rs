//! Input rules shared by the server (authoritative) and the browser (early feedback).

pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_EMAIL_CHARS: usize = 254;
pub const MAX_TEXT_CHARS: usize = 500;
pub const MAX_ID_CHARS: usize = 64;
pub const MIN_POINTS: u64 = 1;
pub const MAX_POINTS: u64 = 1_000_000;
pub const MIN_PASSWORD_CHARS: usize = 10;
pub const MAX_PASSWORD_CHARS: usize = 200;
/// Longest search text (`GET /api/members?q=`): longer says nothing more and costs a scan.
pub const MAX_QUERY_CHARS: usize = 200;

/// A trimmed, non-empty name of reasonable length.
pub fn name(raw: &str) -> Result<String, String> {
    let name = raw.trim();
    if name.is_empty() {
        return Err("name must not be empty".into());
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(format!("name must be at most {MAX_NAME_CHARS} characters"));
    }
    if name.chars().any(char::is_control) {
        return Err("name must not contain control characters".into());
    }
    Ok(name.to_string())
}

/// A plausible email address: one `@`, a non-empty local part, a dotted domain, no spaces.
/// Kept as typed (trimmed); uniqueness is compared case-insensitively via [`email_key`].
pub fn email(raw: &str) -> Result<String, String> {
    let email = raw.trim();
    let bad = || Err(format!("'{email}' is not a valid email address"));
    if email.is_empty() {
        return Err("email must not be empty".into());
    }
    if email.chars().count() > MAX_EMAIL_CHARS {
        return Err(format!("email must be at most {MAX_EMAIL_CHARS} characters"));
    }
    let Some((local, domain)) = email.split_once('@') else {
        return bad();
    };
    let domain_ok = !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..");
    if local.is_empty() || !domain_ok || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad();
    }
    Ok(email.to_string())
}

/// The key under which an email is reserved: unique per member, case-insensitive.
pub fn email_key(email: &str) -> String {
    email.trim().to_lowercase()
}

pub fn points(points: i64) -> Result<u64, String> {
    if points < MIN_POINTS as i64 || points > MAX_POINTS as i64 {
        return Err(format!("points must be between {MIN_POINTS} and {MAX_POINTS}, got {points}"));
    }
    Ok(points as u64)
}

/// Ids (member, transaction) appear in stream names and URLs: letters, digits, `-` and `_`.
pub fn id(kind: &str, raw: &str) -> Result<String, String> {
    let ok = !raw.is_empty()
        && raw.len() <= MAX_ID_CHARS
        && raw.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(raw.to_string())
    } else {
        Err(format!("{kind} must be 1-{MAX_ID_CHARS} characters of letters, digits, '-' or '_'"))
    }
}

/// Optional free text (reason, reward): trimmed, bounded.
pub fn text(field: &str, raw: Option<&str>) -> Result<Option<String>, String> {
    match raw.map(str::trim) {
        None | Some("") => Ok(None),
        Some(t) if t.chars().count() > MAX_TEXT_CHARS => {
            Err(format!("{field} must be at most {MAX_TEXT_CHARS} characters"))
        }
        Some(t) => Ok(Some(t.to_string())),
    }
}

/// A password as typed: 10 to 200 characters (API.md). Kept exactly as typed, spaces included.
pub fn password(raw: &str) -> Result<&str, String> {
    let chars = raw.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(format!("the password must be at least {MIN_PASSWORD_CHARS} characters"));
    }
    if chars > MAX_PASSWORD_CHARS {
        return Err(format!("the password must be at most {MAX_PASSWORD_CHARS} characters"));
    }
    Ok(raw)
}

/// ISO 4217-shaped currency code: three upper-case letters.
pub fn currency(raw: &str) -> Result<String, String> {
    if raw.len() == 3 && raw.chars().all(|c| c.is_ascii_uppercase()) {
        Ok(raw.to_string())
    } else {
        Err(format!("currency must be three upper-case letters (like EUR), got '{raw}'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_need_a_local_part_and_a_dotted_domain() {
        assert!(email("ada@example.com").is_ok());
        assert!(email("  Ada.Lovelace+x@mail.example.org ").is_ok());
        for bad in
            ["", "ada", "ada@", "@example.com", "ada@example", "a b@example.com", "a@b@c.com", "ada@.com", "ada@x..com"]
        {
            assert!(email(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn email_key_ignores_case_and_surrounding_space() {
        assert_eq!(email_key(" Ada@Example.COM "), "ada@example.com");
    }

    #[test]
    fn names_are_trimmed_and_must_not_be_empty() {
        assert_eq!(name("  Ada  ").as_deref(), Ok("Ada"));
        assert!(name("   ").is_err());
        assert!(name(&"x".repeat(201)).is_err());
    }

    #[test]
    fn points_must_be_within_one_and_a_million() {
        assert_eq!(points(1), Ok(1));
        assert_eq!(points(1_000_000), Ok(1_000_000));
        assert!(points(0).is_err());
        assert!(points(-5).is_err());
        assert!(points(1_000_001).is_err());
    }

    #[test]
    fn passwords_are_ten_to_two_hundred_characters() {
        assert!(password("123456789").is_err());
        assert_eq!(password("correct horse"), Ok("correct horse"));
        assert!(password(&"é".repeat(200)).is_ok());
        assert!(password(&"x".repeat(201)).is_err());
    }

    #[test]
    fn ids_are_url_and_stream_safe() {
        assert!(id("member_id", "m-123_abc").is_ok());
        assert!(id("member_id", "").is_err());
        assert!(id("member_id", "a/b").is_err());
        assert!(id("member_id", &"a".repeat(65)).is_err());
    }
}
