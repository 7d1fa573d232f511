//! Hosts whose local routes changed and wait to be published, whatever the backend. Callers
//! only mark hosts dirty ([`Marker::mark`], which never waits); the backend's publisher takes
//! them every [`COALESCE`], and marks again what a failed write did not get through.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use super::cache::MAX_ENTRIES;

/// How long changes gather before a write (SCALEOUT §3.3): a client that opens ten forwards at
/// once costs one write, and a visitor on another replica waits well under a second.
pub(crate) const COALESCE: Duration = Duration::from_millis(50);
/// Dirty hosts remembered one by one. Past this many (a long store outage with much churn) the
/// publisher forgets them and reconciles everything instead: every local route, and every entry
/// of its own that the cache holds.
const MAX_DIRTY: usize = MAX_ENTRIES;

/// Marks hosts whose local routes changed. Cheap to clone; never blocks on the store.
#[derive(Clone, Default)]
pub struct Marker(Arc<Dirty>);

#[derive(Default)]
struct Dirty {
    marked: Mutex<Marked>,
    notify: Notify,
}

#[derive(Default)]
pub(crate) struct Marked {
    pub(crate) hosts: HashSet<String>,
    /// Too many to remember: reconcile every host.
    pub(crate) all: bool,
}

impl std::fmt::Debug for Marker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Marker")
    }
}

impl Marker {
    /// `host`'s local routes changed: publish it at the next round.
    pub fn mark(&self, host: &str) {
        self.lock().add(host);
        self.0.notify.notify_one();
    }

    fn lock(&self) -> MutexGuard<'_, Marked> {
        self.0.marked.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn take(&self) -> Marked {
        std::mem::take(&mut *self.lock())
    }

    /// Marks again what a failed write did not get through.
    pub(crate) fn restore(&self, marked: Marked) {
        {
            let mut current = self.lock();
            current.all |= marked.all;
            for host in &marked.hosts {
                current.add(host);
            }
        }
        self.0.notify.notify_one();
    }

    pub(crate) async fn dirty(&self) {
        self.0.notify.notified().await;
    }
}

impl Marked {
    fn add(&mut self, host: &str) {
        if self.all || self.hosts.contains(host) {
            return;
        }
        if self.hosts.len() >= MAX_DIRTY {
            self.hosts = HashSet::new();
            self.all = true;
            return;
        }
        self.hosts.insert(host.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_coalesce_and_overflow_into_a_reconcile() {
        let marker = Marker::default();
        marker.mark("a");
        marker.mark("a");
        marker.mark("b");
        let taken = marker.take();
        assert_eq!((taken.hosts.len(), taken.all), (2, false));
        assert!(marker.take().hosts.is_empty(), "taking clears");
        marker.restore(taken);
        assert_eq!(
            marker.take().hosts.len(),
            2,
            "a failed write marks its hosts again"
        );
        let mut marked = Marked::default();
        for i in 0..=MAX_DIRTY {
            marked.add(&i.to_string());
        }
        assert!(
            marked.all && marked.hosts.is_empty(),
            "bounded: past the cap, reconcile all"
        );
        marked.add("more");
        assert!(marked.hosts.is_empty());
    }
}
