//! One ACME order: the account's new order, each authorization answered with our challenge type
//! (published here, and in a cluster also in the store so any replica the CA reaches answers),
//! finalized, written to disk, returned.

use std::sync::Arc;
use std::time::Duration;

use instant_acme::{AuthorizationStatus, ChallengeType, Identifier, NewOrder, OrderStatus, RetryPolicy};

use super::fleet::Stored;
use super::shared::SharedStore;
use super::{AcmeError, AcmeManager};
use crate::config::ChallengeKind;
use crate::tls::challenge::{Challenges, Pending};

/// Polling while the server validates and issues.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .timeout(Duration::from_secs(90));

impl AcmeManager {
    /// One order: authorizations answered with our challenge type, finalized, stored, returned.
    pub(super) async fn order(&self, domain: &str) -> Result<Stored, AcmeError> {
        let account = self.account().await?;
        let ids = [Identifier::Dns(domain.to_owned())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await?;
        tracing::info!(domain, url = order.url(), "ACME order placed");
        let kind = match self.cfg.challenge {
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
            ChallengeKind::Http01 => ChallengeType::Http01,
        };
        // Withdrawn when the order ends however it ends: error, timeout (the future is dropped)
        // or shutdown.
        let mut published = Published {
            challenges: &self.challenges,
            entries: Vec::new(),
            shared: self.fleet.as_ref().map(|f| (f.store(), Vec::new())),
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            if authz.status == AuthorizationStatus::Valid {
                continue;
            }
            let ident = authz.identifier().to_string();
            let mut challenge = authz
                .challenge(kind.clone())
                .ok_or(AcmeError::NoChallenge(self.cfg.challenge.name()))?;
            let key_auth = challenge.key_authorization();
            let (pending, answer) = match self.cfg.challenge {
                ChallengeKind::TlsAlpn01 => {
                    let digest = key_auth.digest();
                    self.challenges
                        .add_tls_alpn(&ident, digest.as_ref())
                        .map_err(AcmeError::Challenge)?;
                    let hex = data_encoding::HEXLOWER.encode(digest.as_ref());
                    (Pending::TlsAlpn01(ident.to_ascii_lowercase()), hex)
                }
                ChallengeKind::Http01 => {
                    self.challenges.add_http01(&challenge.token, key_auth.as_str());
                    (
                        Pending::Http01(challenge.token.clone()),
                        key_auth.as_str().to_owned(),
                    )
                }
            };
            published.entries.push((ident.clone(), challenge.token.clone()));
            // Before the CA is told: the replica it reaches may be another one.
            if let (Some(fleet), Some((_, shared))) = (&self.fleet, &mut published.shared) {
                match fleet.publish(&pending, &answer).await {
                    Ok(()) => shared.push(pending),
                    Err(e) => tracing::warn!(
                        domain,
                        error = %e,
                        "challenge answer not in the cluster store: only this replica answers it"
                    ),
                }
            }
            challenge.set_ready().await?;
            tracing::info!(
                domain,
                identifier = ident,
                challenge = self.cfg.challenge.name(),
                "challenge ready"
            );
        }
        self.finish(&mut order, domain).await
    }

    async fn finish(&self, order: &mut instant_acme::Order, domain: &str) -> Result<Stored, AcmeError> {
        let status = order.poll_ready(&POLL).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Order {
                domain: domain.to_owned(),
                status: format!("{status:?}"),
            });
        }
        let key_pem = order.finalize().await?;
        let chain_pem = order.poll_certificate(&POLL).await?;
        let stored = Stored::new(chain_pem, key_pem).map_err(AcmeError::Issued)?;
        self.store.save_cert(domain, &stored.chain_pem, &stored.key_pem)?;
        Ok(stored)
    }
}

/// Challenge answers published for one order; dropping it withdraws them, from the store too
/// (in the background; they expire there anyway).
struct Published<'a> {
    challenges: &'a Challenges,
    entries: Vec<(String, String)>,
    shared: Option<(Arc<dyn SharedStore>, Vec<Pending>)>,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for (ident, token) in &self.entries {
            self.challenges.remove(ident, token);
        }
        let Some((store, pending)) = self.shared.take() else {
            return;
        };
        if pending.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for p in pending {
                    let _ = store.delete(&super::fleet::pending_key(&p)).await;
                }
            });
        }
    }
}
