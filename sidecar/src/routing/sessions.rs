//! Which worker each recent conversation went to: a bounded LRU keyed by the session hash.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};

use lru::LruCache;

use super::SessionKey;

/// Conversations remembered; the least recent are forgotten first.
const CAPACITY: NonZeroUsize = match NonZeroUsize::new(65_536) {
    Some(n) => n,
    None => unreachable!(),
};

/// Session → worker.
pub struct Sessions {
    map: Mutex<LruCache<u64, Arc<str>>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            map: Mutex::new(LruCache::new(CAPACITY)),
        }
    }
}

impl Sessions {
    /// The worker this session last went to.
    pub fn get(&self, key: SessionKey) -> Option<Arc<str>> {
        self.lock().get(&key.hash).cloned()
    }

    /// The session now lives on `worker`.
    pub fn set(&self, key: SessionKey, worker: &Arc<str>) {
        self.lock().put(key.hash, worker.clone());
    }

    /// Drop every session on `worker`.
    pub fn forget(&self, worker: &str) {
        let mut map = self.lock();
        let stale: Vec<u64> = map
            .iter()
            .filter(|(_, w)| &***w == worker)
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            map.pop(&k);
        }
    }

    /// Sessions remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<u64, Arc<str>>> {
        // A panic elsewhere cannot leave the map inconsistent; keep routing.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
