//! Rows a projection keeps in memory between batches, so a batch reads from its table only the
//! members it has not seen lately.
//!
//! Exact only while this projection is the one writer of its table, so the runner calls
//! [`RowCache::forget`] whenever that may not hold or a batch may not have committed: when it
//! starts (another node may have run the projection meanwhile), when it reloads the checkpoints,
//! and after any failed batch. A batch takes its rows out of the cache and puts them back only
//! after it wrote them; the runner forgets them again if the commit then fails.

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
        let mut rows = self.lock();
        if rows.len() + batch.len() > self.limit {
            rows.clear();
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
}
