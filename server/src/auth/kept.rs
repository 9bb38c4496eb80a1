//! A copy in memory of identity rows (sessions, accounts, keys), kept only while it can be kept
//! true: on PostgreSQL, only while this node hears the others' revocations (see `Auth::listening`).
//! Switched off, it holds nothing and every lookup goes to the table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{PoisonError, RwLock};

pub struct Kept<V> {
    rows: RwLock<HashMap<String, V>>,
    on: AtomicBool,
    /// Beyond this many rows the copy starts over (every row is still in the table).
    capacity: usize,
}

impl<V: Clone> Kept<V> {
    pub fn new(on: bool, capacity: usize) -> Self {
        Kept { rows: RwLock::default(), on: AtomicBool::new(on), capacity }
    }

    /// Keep rows or not; either way the copy starts empty.
    pub fn set_on(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
        self.rows.write().unwrap_or_else(PoisonError::into_inner).clear();
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    pub fn get(&self, key: &str) -> Option<V> {
        self.rows.read().unwrap_or_else(PoisonError::into_inner).get(key).cloned()
    }

    /// Keep `value` (when on).
    pub fn put(&self, key: String, value: V) {
        if !self.is_on() {
            return;
        }
        let mut rows = self.rows.write().unwrap_or_else(PoisonError::into_inner);
        if rows.len() >= self.capacity {
            rows.clear();
        }
        rows.insert(key, value);
    }

    pub fn forget(&self, key: &str) {
        self.rows.write().unwrap_or_else(PoisonError::into_inner).remove(key);
    }

    /// Keep only the rows `keep` says to.
    pub fn retain(&self, keep: impl FnMut(&String, &mut V) -> bool) {
        self.rows.write().unwrap_or_else(PoisonError::into_inner).retain(keep);
    }

    /// Every row kept, copied out.
    pub fn rows(&self) -> Vec<(String, V)> {
        let rows = self.rows.read().unwrap_or_else(PoisonError::into_inner);
        rows.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}
