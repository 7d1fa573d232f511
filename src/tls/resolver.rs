//! Certificate selection by SNI for rustls, over a table that SIGHUP swaps whole, certificates
//! obtained at run time (ACME), and an optional local CA that mints for hosts the composer allows.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::certs::CertTable;
use super::local_ca::LocalCa;

/// Given an SNI, the host the local CA may mint a certificate for, or `None`. Handed in by
/// whoever composes the gateway (it knows which tunnel hosts are live); the TLS stage does not.
pub(crate) type MayMint = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// rustls' certificate hook: most specific certificate first, minted ones for allowed hosts.
#[derive(Default)]
pub(crate) struct CertResolver {
    table: ArcSwap<CertTable>,
    /// Certificates obtained at run time (ACME), by exact name.
    dynamic: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    local_ca: Option<(LocalCa, MayMint)>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertResolver")
            .field("local_ca", &self.local_ca.is_some())
            .finish_non_exhaustive()
    }
}

impl CertResolver {
    pub(crate) fn new(table: CertTable, local_ca: Option<(LocalCa, MayMint)>) -> Self {
        Self {
            table: ArcSwap::from_pointee(table),
            dynamic: RwLock::new(HashMap::new()),
            local_ca,
        }
    }

    /// Serves `key` for `name` from the next handshake on.
    pub(crate) fn insert_dynamic(&self, name: &str, key: Arc<CertifiedKey>) {
        let mut d = self.dynamic.write().unwrap_or_else(|p| p.into_inner());
        d.insert(name.to_ascii_lowercase(), key);
    }

    fn dynamic_exact(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.dynamic.read().ok()?.get(&name.to_ascii_lowercase()).cloned()
    }

    fn dynamic_any(&self) -> Option<Arc<CertifiedKey>> {
        self.dynamic.read().ok()?.values().next().cloned()
    }

    /// Whether a static or issued certificate names `host` (exactly or by wildcard).
    pub(crate) fn covers(&self, host: &str) -> bool {
        self.table.load().lookup_named(host).is_some() || self.dynamic_exact(host).is_some()
    }

    /// The most specific certificate: exact (static, then issued), wildcard, minted by the local
    /// CA, then the default (or any issued one when nothing else exists).
    pub(crate) fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let table = self.table.load();
        let named = sni.and_then(|s| {
            table
                .lookup_exact(s)
                .or_else(|| self.dynamic_exact(s))
                .or_else(|| table.lookup_wildcard(s))
                .or_else(|| self.mint(s))
        });
        named
            .or_else(|| table.lookup(None))
            .or_else(|| self.dynamic_any())
    }

    fn mint(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let (ca, may_mint) = self.local_ca.as_ref()?;
        // Only for hosts the composer allows: random names must not make us mint without end.
        let host = may_mint(sni)?;
        ca.certificate_for(&host)
    }

    /// Puts a reloaded table in service for new handshakes.
    pub(crate) fn swap(&self, table: CertTable) {
        self.table.store(Arc::new(table));
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}
