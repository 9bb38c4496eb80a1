//! Who may do what: the one table of API.md "Identity and access", as a pure function.
//!
//! Every surface asks [`authorize`]: the REST extractor, each server function, the `/ws` upgrade
//! and each `subscribe`. A member asking about another member's id is told exactly what an
//! unknown id is told ([`Denied::NotFound`]), so member ids cannot be probed.

use serde::{Deserialize, Serialize};

/// What a key or a person's account may do beyond a member's own account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub enum Role {
    /// A sales channel (point of sale, web shop): posts purchases, nothing else.
    Channel,
    /// A metrics scraper: reads `/metrics`, nothing else.
    Metrics,
    /// A change data capture feed (Debezium): posts change events to `/api/cdc/{source}`, nothing
    /// else.
    Cdc,
    /// People who run the programme.
    Staff,
    /// Staff, plus keys, people accounts and operations.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Channel => "channel",
            Role::Metrics => "metrics",
            Role::Cdc => "cdc",
            Role::Staff => "staff",
            Role::Admin => "admin",
        }
    }

    pub fn parse(raw: &str) -> Option<Role> {
        match raw {
            "channel" => Some(Role::Channel),
            "metrics" => Some(Role::Metrics),
            "cdc" => Some(Role::Cdc),
            "staff" => Some(Role::Staff),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// Roles a person's account may have (keys may have any).
    pub fn for_people(raw: &str) -> Option<Role> {
        Role::parse(raw).filter(|r| matches!(r, Role::Staff | Role::Admin))
    }

    fn is_staff(self) -> bool {
        matches!(self, Role::Staff | Role::Admin)
    }
}

/// Who is asking, as the server resolved it from a session cookie or a bearer key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Caller {
    Anonymous,
    /// A member signed in to their own account.
    Member {
        account_id: String,
        member_id: String,
    },
    /// A person with a staff or admin account.
    Person {
        account_id: String,
        role: Role,
        name: String,
    },
    /// A machine client's key.
    Key {
        key_id: String,
        role: Role,
        name: String,
    },
}

impl Caller {
    /// `metadata.actor` of the events this caller causes (API.md).
    pub fn actor(&self) -> String {
        match self {
            Caller::Anonymous => "anonymous".to_string(),
            Caller::Member { member_id, .. } => format!("member:{member_id}"),
            Caller::Person { account_id, .. } => format!("user:{account_id}"),
            Caller::Key { key_id, .. } => format!("key:{key_id}"),
        }
    }

    /// The role that decides what this caller may do (members have none).
    pub fn role(&self) -> Option<Role> {
        match self {
            Caller::Person { role, .. } | Caller::Key { role, .. } => Some(*role),
            Caller::Anonymous | Caller::Member { .. } => None,
        }
    }

    pub fn is_staff(&self) -> bool {
        self.role().is_some_and(Role::is_staff)
    }

    pub fn is_admin(&self) -> bool {
        self.role() == Some(Role::Admin)
    }

    pub fn is_signed_in(&self) -> bool {
        !matches!(self, Caller::Anonymous)
    }

    /// The member bound to this caller's account, for members.
    pub fn member_id(&self) -> Option<&str> {
        match self {
            Caller::Member { member_id, .. } => Some(member_id),
            _ => None,
        }
    }

    /// `kind` of `GET /api/me`: member, staff, admin or key.
    pub fn kind(&self) -> &'static str {
        match self {
            Caller::Anonymous => "anonymous",
            Caller::Member { .. } => "member",
            Caller::Person { role: Role::Admin, .. } => "admin",
            Caller::Person { .. } => "staff",
            Caller::Key { .. } => "key",
        }
    }
}

/// What is asked for, one entry per row of API.md's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// `GET /api/members/{id}`, `…/events`, the page, the `member:<id>` topic.
    ReadMember(&'a str),
    /// `PATCH /api/members/{id}` (name, email).
    UpdateProfile(&'a str),
    /// `POST …/points/redeem`.
    Redeem(&'a str),
    /// Enrol, list and search, earn, suspend, reactivate, issue access links, the `members` topic,
    /// a member's audit trail with its actors.
    ManageMembers,
    /// `POST /api/transactions`.
    RecordPurchase,
    /// `GET /api/projections`, what a consumer holds back (`…/parked`).
    Operations,
    /// Retry or skip parked events (`POST /api/projections/{name}/parked/…`).
    OperateViews,
    /// `GET /metrics`.
    ReadMetrics,
    /// `POST /api/cdc/{source}`: change events of a system of record.
    FeedChanges,
    /// Keys and people accounts.
    Administer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// 401 `unauthenticated`: no (valid) credentials.
    Unauthenticated,
    /// 403 `forbidden`.
    Forbidden,
    /// 404 `member_not_found`: another member's id, told apart from nothing else.
    NotFound,
}

/// The table of API.md "What each principal may do".
pub fn authorize(caller: &Caller, action: Action) -> Result<(), Denied> {
    let role = match caller {
        Caller::Anonymous => return Err(Denied::Unauthenticated),
        Caller::Member { member_id, .. } => {
            return match action {
                Action::ReadMember(id) | Action::UpdateProfile(id) | Action::Redeem(id) if id == member_id => Ok(()),
                Action::ReadMember(_) | Action::UpdateProfile(_) | Action::Redeem(_) => Err(Denied::NotFound),
                _ => Err(Denied::Forbidden),
            };
        }
        Caller::Person { role, .. } | Caller::Key { role, .. } => *role,
    };
    let allowed = match action {
        Action::ReadMember(_) | Action::UpdateProfile(_) | Action::Redeem(_) | Action::ManageMembers => role.is_staff(),
        Action::RecordPurchase => role.is_staff() || role == Role::Channel,
        Action::Operations => role.is_staff(),
        Action::ReadMetrics => role.is_staff() || role == Role::Metrics,
        Action::FeedChanges => role == Role::Cdc || role == Role::Admin,
        Action::Administer | Action::OperateViews => role == Role::Admin,
    };
    if allowed {
        Ok(())
    } else {
        Err(Denied::Forbidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> Caller {
        Caller::Member { account_id: format!("a-{id}"), member_id: id.into() }
    }
    fn person(role: Role) -> Caller {
        Caller::Person { account_id: "p1".into(), role, name: "Pat".into() }
    }
    fn key(role: Role) -> Caller {
        Caller::Key { key_id: "k1".into(), role, name: "till 1".into() }
    }

    /// The columns of API.md's table, in its order.
    fn columns() -> Vec<(&'static str, Caller)> {
        vec![
            ("anonymous", Caller::Anonymous),
            ("member, own", member("ada")),
            ("member, another's id", member("grace")),
            ("key channel", key(Role::Channel)),
            ("staff", person(Role::Staff)),
            ("admin", person(Role::Admin)),
        ]
    }

    use Denied::{Forbidden as F, NotFound as N, Unauthenticated as U};
    const OK: Result<(), Denied> = Ok(());

    #[track_caller]
    fn row(action: Action, expected: [Result<(), Denied>; 6]) {
        for ((column, caller), expected) in columns().into_iter().zip(expected) {
            assert_eq!(authorize(&caller, action), expected, "{action:?} as {column}");
        }
    }

    #[test]
    fn a_member_reads_and_changes_only_their_own_account_and_another_id_looks_unknown() {
        row(Action::ReadMember("ada"), [Err(U), OK, Err(N), Err(F), OK, OK]);
        row(Action::UpdateProfile("ada"), [Err(U), OK, Err(N), Err(F), OK, OK]);
        row(Action::Redeem("ada"), [Err(U), OK, Err(N), Err(F), OK, OK]);
    }

    #[test]
    fn only_staff_and_admins_manage_members() {
        row(Action::ManageMembers, [Err(U), Err(F), Err(F), Err(F), OK, OK]);
    }

    #[test]
    fn purchases_come_from_channels_and_staff() {
        row(Action::RecordPurchase, [Err(U), Err(F), Err(F), OK, OK, OK]);
    }

    #[test]
    fn operations_and_metrics_are_for_staff() {
        row(Action::Operations, [Err(U), Err(F), Err(F), Err(F), OK, OK]);
        row(Action::ReadMetrics, [Err(U), Err(F), Err(F), Err(F), OK, OK]);
    }

    #[test]
    fn keys_and_people_accounts_are_for_admins_only() {
        row(Action::Administer, [Err(U), Err(F), Err(F), Err(F), Err(F), OK]);
    }

    #[test]
    fn a_metrics_key_reads_metrics_and_nothing_else() {
        let scraper = key(Role::Metrics);
        assert_eq!(authorize(&scraper, Action::ReadMetrics), OK);
        for action in [
            Action::ReadMember("ada"),
            Action::UpdateProfile("ada"),
            Action::Redeem("ada"),
            Action::ManageMembers,
            Action::RecordPurchase,
            Action::Operations,
            Action::Administer,
        ] {
            assert_eq!(authorize(&scraper, action), Err(F), "{action:?}");
        }
    }

    #[test]
    fn a_cdc_key_feeds_changes_and_nothing_else() {
        row(Action::FeedChanges, [Err(U), Err(F), Err(F), Err(F), Err(F), OK]);
        let feed = key(Role::Cdc);
        assert_eq!(authorize(&feed, Action::FeedChanges), OK);
        for action in [
            Action::ReadMember("ada"),
            Action::ManageMembers,
            Action::RecordPurchase,
            Action::Operations,
            Action::ReadMetrics,
            Action::Administer,
        ] {
            assert_eq!(authorize(&feed, action), Err(F), "{action:?}");
        }
    }

    #[test]
    fn staff_and_admin_keys_act_as_staff_and_admins() {
        assert_eq!(authorize(&key(Role::Staff), Action::ManageMembers), OK);
        assert_eq!(authorize(&key(Role::Staff), Action::Administer), Err(F));
        assert_eq!(authorize(&key(Role::Admin), Action::Administer), OK);
    }

    #[test]
    fn actors_name_who_caused_an_event() {
        assert_eq!(member("ada").actor(), "member:ada");
        assert_eq!(person(Role::Staff).actor(), "user:p1");
        assert_eq!(key(Role::Channel).actor(), "key:k1");
    }

    #[test]
    fn people_accounts_are_staff_or_admin() {
        assert_eq!(Role::for_people("staff"), Some(Role::Staff));
        assert_eq!(Role::for_people("admin"), Some(Role::Admin));
        assert_eq!(Role::for_people("channel"), None);
        assert_eq!(Role::for_people("root"), None);
    }
}
