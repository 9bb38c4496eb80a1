//! An in-memory copy of recently read or changed membership views, as their stored JSON.
//!
//! Kept coherent by the one path every view change takes on this node (`fanout::ViewFeed`): the
//! projector's commits on SQLite, the LISTEN/NOTIFY feed on PostgreSQL. An entry is replaced
//! only by a newer position, so a slow database read can never overwrite a fresher change. While
//! the PostgreSQL feed is disconnected the cache is switched off and emptied, since changes could
//! be missed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

pub struct ViewCache {
    entries: RwLock<HashMap<String, (i64, Arc<str>)>>,
    capacity: usize,
    enabled: AtomicBool,
}

impl ViewCache {
    pub fn new(capacity: usize) -> Self {
        ViewCache { entries: RwLock::new(HashMap::new()), capacity, enabled: AtomicBool::new(capacity > 0) }
    }

    pub fn get(&self, member_id: &str) -> Option<(Arc<str>, i64)> {
        if !self.enabled.load(Ordering::Acquire) {
            return None;
        }
        let entries = self.entries.read().ok()?;
        entries.get(member_id).map(|(p, json)| (json.clone(), *p))
    }

    /// Keep `json` at `position` unless a newer one is already here.
    pub fn put(&self, member_id: &str, position: i64, json: Arc<str>) {
        if !self.enabled.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut entries) = self.entries.write() else { return };
        if let Some((p, _)) = entries.get(member_id) {
            if *p >= position {
                return;
            }
        } else if entries.len() >= self.capacity {
            // Bounded: make room by dropping an arbitrary entry (it is re-read on demand).
            if let Some(victim) = entries.keys().next().cloned() {
                entries.remove(&victim);
            }
        }
        entries.insert(member_id.to_string(), (position, json));
    }

    /// Empty and stop caching (`false`), or start caching again (`true`).
    pub fn set_enabled(&self, on: bool) {
        if let Ok(mut entries) = self.entries.write() {
            entries.clear();
        }
        self.enabled.store(on && self.capacity > 0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_view_never_replaces_a_newer_one() {
        let cache = ViewCache::new(10);
        cache.put("a", 5, "five".into());
        cache.put("a", 3, "three".into());
        assert_eq!(cache.get("a").map(|(j, p)| (j.to_string(), p)), Some(("five".into(), 5)));
        cache.put("a", 7, "seven".into());
        assert_eq!(cache.get("a").map(|(_, p)| p), Some(7));
    }

    #[test]
    fn the_cache_stays_within_its_capacity_and_can_be_switched_off() {
        let cache = ViewCache::new(2);
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            cache.put(id, i as i64, "{}".into());
        }
        assert_eq!(["a", "b", "c"].iter().filter(|id| cache.get(id).is_some()).count(), 2);
        cache.set_enabled(false);
        assert!(cache.get("c").is_none());
        cache.put("d", 1, "{}".into());
        assert!(cache.get("d").is_none());
    }
}
