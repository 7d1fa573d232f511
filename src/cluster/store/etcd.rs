//! The directory in etcd: one lease per replica, kept alive by `keepalive`; a publisher that
//! writes this replica's routes under it (`publish`); a watcher that keeps the cache of
//! everyone's (`watch`).
//!
//! Nothing here blocks the gateway: hosts are marked dirty without waiting, lookups read the
//! cache under a short lock, and a store that is down only delays writes and stales the cache.
//! The store may be down at start too: the client connects in the background and retries.

mod acme;
mod keepalive;
mod publish;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tokio::sync::{mpsc, oneshot};

use super::local::LocalRoutes;
use super::marker::Marker;
use super::state::{read, read_auth, Backoff, Boxed, Parts, RecordWriter, Shared, Started, StoreError};
use crate::config::{ClusterConfig, StoreTls};

/// HTTP/2 pings on the store connection find a store that hangs (SIGSTOP, a dead host) while
/// streams wait for events. etcd refuses pings more often than every 5 s
/// (`--grpc-keepalive-min-time`), and without a stream open (so none are sent then).
const H2_PING_INTERVAL: Duration = Duration::from_secs(10);

/// Checks the config files and hands over the etcd tasks (they connect in the background).
pub(super) fn start(
    cfg: &ClusterConfig,
    (shared, local, marker): Parts,
    stop: mpsc::Receiver<oneshot::Sender<()>>,
) -> Result<Started, StoreError> {
    let options = connect_options(cfg)?;
    let writer = Writer(Arc::new(tokio::sync::OnceCell::new()));
    let acme = acme::EtcdAcme::new(
        (writer.0.clone(), shared.lease.subscribe()),
        shared.keys.acme(),
        shared.rid.to_string(),
        cfg.store_timeout,
    );
    let tasks = run(
        shared,
        cfg.endpoints.clone(),
        options,
        writer.0.clone(),
        local,
        marker,
        stop,
    );
    Ok((Box::new(writer), Arc::new(acme), Box::pin(tasks)))
}

/// Writes the replica record with the client, once connected.
struct Writer(Arc<tokio::sync::OnceCell<Client>>);

impl RecordWriter for Writer {
    fn put_record<'a>(&'a self, shared: &'a Shared, lease: i64, value: Vec<u8>) -> Boxed<'a, bool> {
        Box::pin(async move {
            let Some(client) = self.0.get() else {
                return false;
            };
            let key = shared.keys.replica(&shared.rid);
            let mut kv = client.kv_client();
            let put = kv.put(key, value, Some(etcd_client::PutOptions::new().with_lease(lease)));
            matches!(tokio::time::timeout(shared.timings.request, put).await, Ok(Ok(_)))
        })
    }
}

/// Builds the client options from `[cluster]`: TLS (CA, client identity) and `user:password`.
fn connect_options(cfg: &ClusterConfig) -> Result<ConnectOptions, StoreError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(cfg.store_timeout)
        .with_keep_alive(H2_PING_INTERVAL, cfg.store_timeout)
        .with_keep_alive_while_idle(false);
    if let Some(tls) = &cfg.store_tls {
        if let Some(e) = cfg.endpoints.iter().find(|e| !e.starts_with("https://")) {
            return Err(StoreError::TlsWithHttp(e.clone()));
        }
        options = options.with_tls(tls_options(tls)?);
    }
    if let Some(path) = &cfg.store_auth_file {
        let (user, password) = read_auth(path)?;
        options = options.with_user(user, password).with_auto_token_refresh(true);
    }
    Ok(options)
}

fn tls_options(tls: &StoreTls) -> Result<TlsOptions, StoreError> {
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
    if let Some((cert, key)) = &tls.identity {
        options = options.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(options)
}

/// Connects, then runs the lease, the publisher and the watcher until cancelled.
async fn run(
    shared: Arc<Shared>,
    endpoints: Vec<String>,
    options: ConnectOptions,
    cell: Arc<tokio::sync::OnceCell<Client>>,
    local: Arc<dyn LocalRoutes>,
    marker: Marker,
    stop: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let mut backoff = Backoff::new(shared.timings);
    let client = loop {
        let connect = Client::connect(&endpoints, Some(options.clone()));
        match tokio::time::timeout(shared.timings.request, connect).await {
            Ok(Ok(client)) => break client,
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot connect to the cluster store; retrying"),
            Err(_) => tracing::warn!("the cluster store did not answer in time; retrying"),
        }
        tokio::time::sleep(backoff.next()).await;
    };
    let _ = cell.set(client.clone());
    tokio::join!(
        super::keepalive::run(shared.clone(), keepalive::EtcdLease::new(client.clone()), stop),
        super::publish::run(shared.clone(), publish::EtcdPublish::new(&client), local, marker),
        watch::run(shared, client),
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use std::path::Path;

    fn config(dir: &Path) -> ClusterConfig {
        ClusterConfig::for_tests(dir, crate::config::StoreKind::Etcd, "http://127.0.0.1:1")
    }

    #[test]
    fn config_files_are_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        assert!(connect_options(&cfg).is_ok());
        let auth = dir.path().join("auth");
        cfg.store_auth_file = Some(auth.clone());
        assert_eq!(connect_options(&cfg).unwrap_err().reason(), "read_file");
        std::fs::write(&auth, "edgemux\n").unwrap();
        assert_eq!(connect_options(&cfg).unwrap_err().reason(), "auth_format");
        std::fs::write(&auth, "edgemux:s3cret:x\n").unwrap();
        assert_eq!(read_auth(&auth).unwrap(), ("edgemux".into(), "s3cret:x".into()));
        assert!(connect_options(&cfg).is_ok());
        cfg.store_tls = Some(StoreTls {
            ca: dir.path().join("ca.pem"),
            identity: None,
        });
        assert_eq!(connect_options(&cfg).unwrap_err().reason(), "tls_with_http");
        cfg.endpoints = vec!["https://127.0.0.1:1".into()];
        assert_eq!(connect_options(&cfg).unwrap_err().reason(), "read_file");
        std::fs::write(dir.path().join("ca.pem"), "not checked until a connection").unwrap();
        assert!(connect_options(&cfg).is_ok());
    }
}
