//! The watcher: keeps the cache equal to the store. A full read of the replicas and routes at
//! one revision R, in pages, builds a fresh cache that then replaces the old one; a watch from
//! R+1 applies every later event in order (SCALEOUT §3.3).
//!
//! A broken watch resumes from the cache's revision, so nothing is missed. Two things force a
//! new full read instead: the store compacted past that revision (it says so), or the store's
//! revision is now below the cache's (it was wiped or restored: resuming would wait for
//! revisions that mean something else).

use std::sync::Arc;

use etcd_client::{Client, GetOptions, WatchOptions, WatchResponse};

use super::{Backoff, Shared};
use crate::cluster::store::cache::{Applied, Change};

/// Entries per page of a full read: at ≤ 1 KiB each, a page stays well under the client's
/// 4 MiB message limit.
const PAGE: i64 = 1000;

/// What to do next.
#[derive(Debug, Clone, Copy)]
enum Next {
    /// A full read, counted with this reason.
    Resync(&'static str),
    /// Watch on from the cache's revision.
    Resume,
}

/// Why a watch ended.
#[derive(Debug)]
enum Ended {
    /// The store compacted past the revision the watch asked for.
    Compacted,
    /// The store ended the watch for another reason.
    Canceled,
    /// The connection failed.
    Broken,
}

/// Follows the store until the task is cancelled.
pub(super) async fn run(shared: Arc<Shared>, client: Client) {
    let mut backoff = Backoff::new(shared.timings);
    let mut next = Next::Resync("start");
    loop {
        let revision = match next {
            Next::Resync(reason) => match read_all(&shared, &client).await {
                Ok(revision) => {
                    resynced(&shared, reason);
                    revision
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cluster directory read failed; retrying");
                    tokio::time::sleep(backoff.next()).await;
                    continue;
                }
            },
            Next::Resume => match store_revision(&shared, &client).await {
                Ok(now) if now < shared.cache().revision() => {
                    tracing::warn!(
                        store = now,
                        cache = shared.cache().revision(),
                        "the cluster store's revision went back (wiped or restored); reading it all again"
                    );
                    next = Next::Resync("gap");
                    continue;
                }
                Ok(_) => shared.cache().revision(),
                Err(e) => {
                    tracing::debug!(error = %e, "cluster store unreachable; retrying");
                    tokio::time::sleep(backoff.next()).await;
                    continue;
                }
            },
        };
        // The store answers: a lease retry need not wait out its backoff.
        shared.store_back.notify_one();
        shared.set_health(|h| h.watch = true);
        let ended = follow(&shared, &client, revision + 1, &mut backoff).await;
        shared.set_health(|h| h.watch = false);
        next = match ended {
            Ended::Compacted => Next::Resync("compacted"),
            Ended::Canceled => Next::Resync("reconnect"),
            Ended::Broken => {
                tokio::time::sleep(backoff.next()).await;
                Next::Resume
            }
        };
    }
}

fn resynced(shared: &Shared, reason: &'static str) {
    crate::metrics::cluster_resync(reason);
    *shared
        .resyncs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(reason)
        .or_default() += 1;
    tracing::info!(
        reason,
        revision = shared.cache().revision(),
        "cluster directory read"
    );
}

/// Reads every replica and route at one revision into a fresh cache, then puts it in place.
async fn read_all(shared: &Shared, client: &Client) -> Result<i64, etcd_client::Error> {
    let (start, end) = shared.keys.watched();
    let mut kv = client.kv_client();
    let mut fresh = shared.cache().fresh();
    let mut revision = 0;
    let mut from = start.into_bytes();
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let page = tokio::time::timeout(shared.timings.request, kv.get(from.clone(), Some(options)))
            .await
            .map_err(|_| timed_out())??;
        if revision == 0 {
            revision = page.header().map_or(0, |h| h.revision());
            fresh.reset(revision, Vec::new());
        }
        for kv in page.kvs() {
            report(fresh.apply(Change::Put {
                key: kv.key().to_vec(),
                value: kv.value().to_vec(),
                revision: kv.mod_revision(),
            }));
        }
        match (page.more(), page.kvs().last()) {
            (true, Some(last)) => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    let entries = fresh.len();
    *shared.cache_mut() = fresh;
    shared.changed();
    crate::metrics::cluster_directory_entries(entries);
    Ok(revision)
}

/// The store's current revision (a count-only read of the watched range).
async fn store_revision(shared: &Shared, client: &Client) -> Result<i64, etcd_client::Error> {
    let (start, end) = shared.keys.watched();
    let options = GetOptions::new().with_range(end).with_count_only();
    let mut kv = client.kv_client();
    let read = kv.get(start, Some(options));
    let page = tokio::time::timeout(shared.timings.request, read)
        .await
        .map_err(|_| timed_out())??;
    Ok(page.header().map_or(0, |h| h.revision()))
}

fn timed_out() -> etcd_client::Error {
    etcd_client::Error::IoError(std::io::ErrorKind::TimedOut.into())
}

/// Watches from `from`, applying events, until the watch ends. Asks for a progress notice every
/// keepalive interval, so the cache's revision stays recent even when nothing in the range
/// changes: a watch that breaks then resumes instead of finding its revision compacted.
async fn follow(shared: &Shared, client: &Client, from: i64, backoff: &mut Backoff) -> Ended {
    let (start, end) = shared.keys.watched();
    let options = WatchOptions::new()
        .with_range(end)
        .with_start_revision(from)
        .with_progress_notify()
        .with_fragment();
    let mut watcher = client.watch_client();
    let open = watcher.watch(start, Some(options));
    let stream = match tokio::time::timeout(shared.timings.request, open).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "cluster directory watch refused");
            return Ended::Broken;
        }
        Err(_) => {
            tracing::debug!("cluster directory watch not opened in time");
            return Ended::Broken;
        }
    };
    tracing::debug!(from, "cluster directory watch open");
    // The request side stays open for as long as the watch: closing it ends the watch.
    let (mut requests, mut responses) = stream.split();
    let every = shared.timings.keepalive;
    let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        let message = tokio::select! {
            m = responses.message() => m,
            _ = progress.tick() => {
                if requests.request_progress().await.is_err() {
                    return Ended::Broken;
                }
                continue;
            }
        };
        let response = match message {
            Ok(Some(r)) => r,
            Ok(None) => return Ended::Broken,
            Err(e) => {
                tracing::debug!(error = %e, "cluster directory watch broke");
                return Ended::Broken;
            }
        };
        if response.canceled() {
            if response.compact_revision() > 0 {
                tracing::info!(
                    compacted = response.compact_revision(),
                    "the cluster store compacted past this replica's watch"
                );
                return Ended::Compacted;
            }
            tracing::warn!(
                reason = response.cancel_reason(),
                "the cluster store ended the directory watch"
            );
            return Ended::Canceled;
        }
        backoff.reset();
        if !response.created() {
            apply(shared, &response);
        }
    }
}

/// One watch response into the cache.
fn apply(shared: &Shared, response: &WatchResponse) {
    crate::metrics::cluster_directory_heard();
    let mut cache = shared.cache_mut();
    if response.events().is_empty() {
        // A progress notice: every event up to its revision has come.
        if let Some(header) = response.header() {
            cache.advance(header.revision());
        }
        return;
    }
    for event in response.events() {
        let Some(kv) = event.kv() else {
            continue;
        };
        // A deleted key's version is 0, a put's at least 1 (etcd's mvcc). Read that rather
        // than `event_type()`, which panics on a type it does not know.
        let change = if kv.version() == 0 {
            Change::Delete {
                key: kv.key().to_vec(),
                revision: kv.mod_revision(),
            }
        } else {
            Change::Put {
                key: kv.key().to_vec(),
                value: kv.value().to_vec(),
                revision: kv.mod_revision(),
            }
        };
        report(cache.apply(change));
    }
    crate::metrics::cluster_directory_entries(cache.len());
    drop(cache);
    shared.changed();
}

fn report(applied: Applied) {
    if let Applied::Dropped(e) = applied {
        crate::metrics::cluster_dropped_entry(e.reason());
        tracing::debug!(error = %e, "cluster directory entry dropped");
    }
}
