//! This node's open WebSockets, by who opened them: so that a principal's sockets can be
//! counted (a cap per principal) and closed the moment its session ends or its key is revoked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// Who opened a socket, as revocations name them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    /// A session (its id's SHA-256) of an account.
    Session {
        hash: String,
        account: String,
    },
    Key(String),
}

impl Owner {
    /// The principal the cap counts against: an account (all its sessions) or a key.
    fn principal(&self) -> &str {
        match self {
            Owner::Session { account, .. } => account,
            Owner::Key(id) => id,
        }
    }
}

struct Open {
    owner: Owner,
    close: CancellationToken,
}

#[derive(Default)]
struct Table {
    open: HashMap<u64, Open>,
    per_principal: HashMap<String, usize>,
}

pub struct Sockets {
    table: Mutex<Table>,
    next: AtomicU64,
    max_per_principal: usize,
}

/// A registered socket: unregistered when dropped. `closed` is cancelled when its principal's
/// access ends.
pub struct Registered {
    id: u64,
    sockets: Arc<Sockets>,
    pub closed: CancellationToken,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.sockets.remove(self.id);
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct TooMany(pub usize);

impl Sockets {
    pub fn new(max_per_principal: usize) -> Arc<Self> {
        Arc::new(Sockets { table: Mutex::default(), next: AtomicU64::new(1), max_per_principal })
    }

    /// Count a new socket of `owner`, unless its principal has as many as allowed already.
    pub fn register(self: &Arc<Self>, owner: Owner) -> Result<Registered, TooMany> {
        let mut table = self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = table.per_principal.entry(owner.principal().to_string()).or_default();
        if *count >= self.max_per_principal {
            return Err(TooMany(self.max_per_principal));
        }
        *count += 1;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        table.open.insert(id, Open { owner, close: close.clone() });
        Ok(Registered { id, sockets: self.clone(), closed: close })
    }

    fn remove(&self, id: u64) {
        let mut table = self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(open) = table.open.remove(&id) else { return };
        let principal = open.owner.principal();
        if let Some(count) = table.per_principal.get_mut(principal) {
            *count -= 1;
            if *count == 0 {
                table.per_principal.remove(principal);
            }
        }
    }

    /// Close every socket whose owner `matches`; returns how many.
    pub fn close_where(&self, matches: impl Fn(&Owner) -> bool) -> usize {
        let table = self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut closed = 0;
        for open in table.open.values().filter(|o| matches(&o.owner) && !o.close.is_cancelled()) {
            open.close.cancel();
            closed += 1;
        }
        closed
    }

    /// The distinct owners of the open sockets (for re-checking them).
    pub fn owners(&self) -> Vec<Owner> {
        let table = self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let owners: std::collections::HashSet<&Owner> = table.open.values().map(|o| &o.owner).collect();
        owners.into_iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(hash: &str, account: &str) -> Owner {
        Owner::Session { hash: hash.into(), account: account.into() }
    }

    #[test]
    fn a_principal_may_open_only_so_many_sockets_and_a_closed_one_frees_its_place() {
        let sockets = Sockets::new(2);
        let a = sockets.register(session("s1", "acc")).expect("first");
        let _b = sockets.register(session("s2", "acc")).expect("second, another session of the account");
        assert_eq!(sockets.register(session("s1", "acc")).err(), Some(TooMany(2)));
        assert!(sockets.register(Owner::Key("k".into())).is_ok(), "other principals are counted apart");
        drop(a);
        assert!(sockets.register(session("s1", "acc")).is_ok());
    }

    #[test]
    fn closing_by_owner_closes_only_those_sockets() {
        let sockets = Sockets::new(10);
        let mine = sockets.register(session("s1", "acc")).expect("mine");
        let other = sockets.register(session("s2", "acc")).expect("other session");
        let key = sockets.register(Owner::Key("k".into())).expect("key");
        assert_eq!(sockets.close_where(|o| matches!(o, Owner::Session { hash, .. } if hash == "s1")), 1);
        assert!(mine.closed.is_cancelled());
        assert!(!other.closed.is_cancelled() && !key.closed.is_cancelled());
        assert_eq!(sockets.close_where(|o| *o == Owner::Key("k".into())), 1);
        assert!(key.closed.is_cancelled());
    }
}
