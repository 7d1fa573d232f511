//! The lease on etcd (`store::keepalive` drives it): grant, keepalive on one stream, revoke.

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};

use super::Shared;
use crate::cluster::store::keepalive::{LeaseIo, Renewal};

/// The etcd client, and the keepalive stream of the current lease.
pub(super) struct EtcdLease {
    client: Client,
    keeper: Option<(i64, LeaseKeeper, LeaseKeepAliveStream)>,
}

impl EtcdLease {
    pub(super) fn new(client: Client) -> Self {
        Self { client, keeper: None }
    }
}

impl LeaseIo for EtcdLease {
    async fn grant(&mut self, shared: &Shared) -> Result<i64, String> {
        let ttl = i64::try_from(shared.timings.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        let mut client = self.client.lease_client();
        match tokio::time::timeout(shared.timings.request, client.grant(ttl, None)).await {
            Ok(Ok(granted)) => Ok(granted.id()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer in time".into()),
        }
    }

    async fn keep_alive(&mut self, shared: &Shared, id: i64) -> Renewal {
        let timeout = shared.timings.request;
        let keeper = match self.keeper.take() {
            Some(k) if k.0 == id => Some(k),
            _ => None,
        };
        let answer = match keeper {
            // Opening the stream sends the first keepalive and reads its answer.
            None => match tokio::time::timeout(timeout, self.client.lease_client().keep_alive(id)).await {
                Ok(Ok((keeper, stream))) => {
                    self.keeper = Some((id, keeper, stream));
                    Ok(true)
                }
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m == "lease not found" => Ok(false),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".into()),
            },
            Some((_, mut keeper, mut stream)) => {
                let sent = keeper.keep_alive().await;
                match tokio::time::timeout(timeout, stream.message()).await {
                    Ok(Ok(Some(r))) if sent.is_ok() => {
                        let alive = r.ttl() > 0;
                        self.keeper = alive.then_some((id, keeper, stream));
                        Ok(alive)
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".into()),
                    _ => Err("keepalive stream closed".into()),
                }
            }
        };
        match answer {
            Ok(true) => Renewal::Alive,
            Ok(false) => Renewal::Lost,
            Err(e) => Renewal::Failed(e),
        }
    }

    async fn revoke(&mut self, shared: &Shared, id: i64) {
        let mut leases = self.client.lease_client();
        let revoke = leases.revoke(id);
        match tokio::time::timeout(shared.timings.request, revoke).await {
            Ok(Ok(_)) => tracing::info!(replica = %shared.rid, "cluster lease revoked"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cluster lease revoke failed; it will expire"),
            Err(_) => tracing::warn!("cluster lease revoke timed out; it will expire"),
        }
    }
}
