//! An in-memory copy of recently read or changed membership views, as their stored JSON.
//!
//! Kept coherent by the one path every view change takes on this node (`fanout::ViewFeed`): the
//! projector's commits on SQLite, the LISTEN/NOTIFY feed on PostgreSQL. An entry is replaced
//! only by a newer position, so a slow database read can never overwrite a fresher change. While
//! the PostgreSQL feed is disconnected the cache is switched off and emptied, since changes could
//! be missed.
//!
//! On SQLite the projector writes the views behind (see `projector`): a view it applied may not
//! be in the table yet. Such a view is never dropped to make room, so every read that finds no
//! entry here finds the current view in the table.
//!
//! A changed view enters as the projector built it and is encoded to JSON the first time
//! something needs the text ([`ViewText`]): under a heavy command load most views are replaced
//! by the next change before anyone reads, watches or writes them, and encoding every one was
//! the largest item of the server's own code in P3's profile (BENCHMARKS.md).

use app::views::MembershipView;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

/// A view's JSON, encoded at most once, when first asked for.
pub struct ViewText(Mutex<Text>);

enum Text {
    Pending(Box<MembershipView>),
    Ready(Arc<str>),
}

impl ViewText {
    pub fn pending(view: MembershipView) -> Self {
        ViewText(Mutex::new(Text::Pending(Box::new(view))))
    }

    pub fn ready(json: Arc<str>) -> Self {
        ViewText(Mutex::new(Text::Ready(json)))
    }

    /// The JSON, encoded now if nothing asked for it before (then kept, and the view dropped).
    pub fn json(&self) -> Result<Arc<str>, serde_json::Error> {
        // A panic while holding the lock leaves either state whole: still usable.
        let mut text = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let json: Arc<str> = match &*text {
            Text::Ready(json) => return Ok(json.clone()),
            Text::Pending(view) => serde_json::to_string(view)?.into(),
        };
        *text = Text::Ready(json.clone());
        Ok(json)
    }
}

pub struct ViewCache {
    entries: RwLock<HashMap<String, (i64, Arc<ViewText>)>>,
    capacity: usize,
    enabled: AtomicBool,
    /// Views up to this position are in the table; entries past it are kept whatever the
    /// capacity (at most what the projector holds unwritten).
    written: AtomicI64,
    /// Raised each time the cache is emptied because the table was replaced (a blue/green swap):
    /// a read of the old table that ends after it must not come back in (see `put_read`).
    generation: AtomicU64,
}

impl ViewCache {
    pub fn new(capacity: usize) -> Self {
        ViewCache {
            entries: RwLock::new(HashMap::new()),
            capacity,
            enabled: AtomicBool::new(capacity > 0),
            written: AtomicI64::new(i64::MAX),
            generation: AtomicU64::new(0),
        }
    }

    /// Taken before reading a view from the table, for [`put_read`](Self::put_read).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A view read from the table when the cache was at `generation`: kept only if the table was
    /// not replaced meanwhile (the read may have found the old one).
    pub fn put_read(&self, member_id: &str, position: i64, json: Arc<str>, generation: u64) {
        if !self.enabled.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut entries) = self.entries.write() else { return };
        // Under the lock `replaced` raises it with: no swap can slip in between.
        if self.generation.load(Ordering::Acquire) == generation {
            self.insert(&mut entries, member_id, position, Arc::new(ViewText::ready(json)));
        }
    }

    /// The table was replaced (a blue/green swap, see `projector::blue_green`) and holds every
    /// view up to `written`: forget every entry, and any read of the old table still under way.
    pub fn replaced(&self, written: i64) {
        if let Ok(mut entries) = self.entries.write() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            entries.clear();
        }
        self.written.store(written, Ordering::Release);
    }

    /// The table holds every view up to `position` (the projector's stored checkpoint).
    pub fn set_written(&self, position: i64) {
        self.written.store(position, Ordering::Release);
    }

    pub fn get(&self, member_id: &str) -> Option<(Arc<str>, i64)> {
        if !self.enabled.load(Ordering::Acquire) {
            return None;
        }
        let (position, text) = self.entries.read().ok()?.get(member_id).map(|(p, text)| (*p, text.clone()))?;
        // Encoded outside the map's lock: other readers and the projector's puts go on meanwhile.
        match text.json() {
            Ok(json) => Some((json, position)),
            Err(err) => {
                // Cannot happen for a view's plain fields; the table's copy is the fallback.
                tracing::error!(error = %err, member_id, "cannot encode a cached view");
                None
            }
        }
    }

    /// Keep `json` at `position` unless a newer one is already here.
    pub fn put(&self, member_id: &str, position: i64, json: Arc<str>) {
        self.put_text(member_id, position, Arc::new(ViewText::ready(json)));
    }

    /// Keep `text` at `position` unless a newer one is already here.
    pub fn put_text(&self, member_id: &str, position: i64, text: Arc<ViewText>) {
        if !self.enabled.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut entries) = self.entries.write() else { return };
        self.insert(&mut entries, member_id, position, text);
    }

    fn insert(
        &self,
        entries: &mut HashMap<String, (i64, Arc<ViewText>)>,
        member_id: &str,
        position: i64,
        text: Arc<ViewText>,
    ) {
        if let Some((p, _)) = entries.get(member_id) {
            if *p >= position {
                return;
            }
        } else if entries.len() >= self.capacity {
            // Bounded: make room by dropping an arbitrary entry the table holds (it is re-read on
            // demand), never one it does not hold yet.
            let written = self.written.load(Ordering::Acquire);
            if let Some(victim) = entries.iter().find(|(_, (p, _))| *p <= written).map(|(id, _)| id.clone()) {
                entries.remove(&victim);
            }
        }
        entries.insert(member_id.to_string(), (position, text));
    }

    /// Empty and stop caching (`false`), or start caching again (`true`).
    pub fn set_enabled(&self, on: bool) {
        if let Ok(mut entries) = self.entries.write() {
            entries.clear();
        }
        self.enabled.store(on && self.capacity > 0, Ordering::Release);
    }
}

/// A changed view: serialized at most once, when first needed, for the table, the view cache and
/// the sockets alike (they share its [`ViewText`]).
#[derive(Clone)]
pub struct ViewRow {
    pub member_id: String,
    pub version: i64,
    pub position: i64,
    pub text: Arc<ViewText>,
}

impl ViewRow {
    pub fn new(view: MembershipView) -> ViewRow {
        ViewRow {
            member_id: view.member_id.clone(),
            version: view.version as i64,
            position: view.position as i64,
            text: Arc::new(ViewText::pending(view)),
        }
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
    fn a_view_is_encoded_once_when_first_read_as_serde_json_would() {
        let view = MembershipView {
            member_id: "m-1".into(),
            name: "Ada \"Countess\" Lovelace".into(),
            email: "ada@example.com".into(),
            status: Default::default(),
            tier: Default::default(),
            points_balance: 120,
            lifetime_points: 150,
            next_tier: None,
            recent_activity: vec![app::views::Activity {
                position: 3,
                kind: "earned".into(),
                points: 150,
                description: "Purchase\nof 150".into(),
                at: "2026-12-03T09:00:00Z".into(),
            }],
            member_since: "2026-12-03T08:00:00Z".into(),
            version: 3,
            position: 3,
        };
        let cache = ViewCache::new(10);
        cache.put_text("m-1", 3, Arc::new(ViewText::pending(view.clone())));
        let (first, position) = cache.get("m-1").expect("cached");
        assert_eq!((&*first, position), (serde_json::to_string(&view).expect("encodes").as_str(), 3));
        let (second, _) = cache.get("m-1").expect("cached");
        assert!(Arc::ptr_eq(&first, &second), "the second read reuses the first one's text");
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

    #[test]
    fn views_the_table_does_not_hold_yet_are_never_dropped() {
        let cache = ViewCache::new(2);
        cache.set_written(10);
        cache.put("a", 11, "{}".into());
        cache.put("b", 12, "{}".into());
        cache.put("c", 13, "{}".into());
        // Over capacity rather than lose a view only memory has.
        assert!(["a", "b", "c"].iter().all(|id| cache.get(id).is_some()));
        cache.set_written(13);
        cache.put("d", 14, "{}".into());
        assert_eq!(["a", "b", "c", "d"].iter().filter(|id| cache.get(id).is_some()).count(), 3);
        assert!(cache.get("d").is_some());
    }
}
