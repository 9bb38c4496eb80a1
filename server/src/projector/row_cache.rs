//! Rows a projection keeps in memory between batches, so a batch reads from its table only the
//! members it has not seen lately.
//!
//! Why the kept rows stay exact: every writer of a projection's table moves the projection's
//! checkpoint in the same transaction, and a batch commits only if the checkpoint is still where
//! this runner left it (`advance_checkpoint`). So when a batch commits, nobody else has written
//! the table since this runner's previous commit. What remains is state a batch kept but never
//! committed, and rows another node wrote while this one was not running. The runner calls
//! [`RowCache::forget`] for both:
//! - when it starts, since another node may have run the projection meanwhile;
//! - when it reloads the checkpoints, since a batch found its checkpoint moved;
//! - after any failed batch.
//!
//! A batch takes its rows out of the cache and puts them back only after it wrote them. If the
//! commit then fails, the runner forgets them again.
//!
//! A projection that writes behind (`membership_view` on SQLite) puts rows back before they are
//! written; it pins them (`keep_pinned`) so that they stay until written, since the table still
//! holds their older selves.

use std::collections::HashMap;
use std::sync::Mutex;

pub struct RowCache<T> {
    rows: Mutex<HashMap<String, T>>,
    /// Beyond this many rows the cache starts over: a batch then reads its rows as it would
    /// without a cache, so a cache too small for the working set costs no more than none.
    limit: usize,
}

impl<T> RowCache<T> {
    pub fn new(limit: usize) -> Self {
        RowCache { rows: Mutex::new(HashMap::new()), limit }
    }

    /// Take out the rows of `ids` the cache holds; also returns the ids it does not hold.
    pub fn take<'a>(&self, ids: &[&'a str]) -> (HashMap<String, T>, Vec<&'a str>) {
        let mut rows = self.lock();
        let mut found = HashMap::with_capacity(ids.len());
        let mut missing = Vec::new();
        for id in ids {
            match rows.remove_entry(*id) {
                Some((id, row)) => {
                    found.insert(id, row);
                }
                None => missing.push(*id),
            }
        }
        (found, missing)
    }

    /// Keep these rows, as the batch's transaction wrote them.
    pub fn keep(&self, batch: HashMap<String, T>) {
        self.keep_pinned(batch, |_| false);
    }

    /// Keep these rows; when starting over, still keep those `pinned` names (rows not in the
    /// table yet, which a batch could not read back from there).
    pub fn keep_pinned(&self, batch: HashMap<String, T>, pinned: impl Fn(&str) -> bool) {
        let mut rows = self.lock();
        if rows.len() + batch.len() > self.limit {
            rows.retain(|id, _| pinned(id));
        }
        rows.extend(batch);
    }

    /// Drop every row: the table may hold something else now.
    pub fn forget(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, T>> {
        // A panic while holding the lock leaves a map that is at worst missing rows: still usable.
        self.rows.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_what_it_kept_once_and_names_the_rest() {
        let cache = RowCache::new(10);
        cache.keep(HashMap::from([("a".to_string(), 1), ("b".to_string(), 2)]));
        let (found, missing) = cache.take(&["a", "c"]);
        assert_eq!(found, HashMap::from([("a".to_string(), 1)]));
        assert_eq!(missing, vec!["c"]);
        // Taken rows are gone until kept again: a batch that fails cannot leave them behind.
        let (found, missing) = cache.take(&["a", "b"]);
        assert_eq!(found, HashMap::from([("b".to_string(), 2)]));
        assert_eq!(missing, vec!["a"]);
    }

    #[test]
    fn starts_over_when_full_and_forgets_on_demand() {
        let cache = RowCache::new(2);
        cache.keep(HashMap::from([("a".to_string(), 1), ("b".to_string(), 2)]));
        cache.keep(HashMap::from([("c".to_string(), 3)]));
        assert_eq!(cache.take(&["a", "b", "c"]).1, vec!["a", "b"]);
        cache.keep(HashMap::from([("d".to_string(), 4)]));
        cache.forget();
        assert_eq!(cache.take(&["d"]).1, vec!["d"]);
    }

    #[test]
    fn pinned_rows_outlive_a_start_over() {
        let cache = RowCache::new(2);
        cache.keep(HashMap::from([("c".to_string(), 3), ("d".to_string(), 4)]));
        cache.keep_pinned(HashMap::from([("e".to_string(), 5)]), |id| id == "c");
        assert_eq!(cache.take(&["c", "d", "e"]).1, vec!["d"]);
    }
}
