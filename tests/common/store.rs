//! The cluster tests' store, etcd or Redis, chosen by `EDGEMUX_TEST_STORE=etcd|redis` (default
//! etcd; anything else fails). Scenarios start, freeze, kill and wipe it through this, so each
//! runs unchanged on both backends.

use super::etcd::Etcd;
use super::process::Proc;
use super::redis::Redis;

/// Which store the tests run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Etcd,
    Redis,
}

impl Backend {
    /// From `EDGEMUX_TEST_STORE`; panics on a value that names no store.
    pub fn from_env() -> Backend {
        match std::env::var("EDGEMUX_TEST_STORE").as_deref() {
            Err(_) | Ok("" | "etcd") => Backend::Etcd,
            Ok("redis") => Backend::Redis,
            Ok(other) => panic!("EDGEMUX_TEST_STORE={other:?}: expected \"etcd\" or \"redis\""),
        }
    }

    /// The scheme of this store's endpoints.
    pub fn scheme(self) -> &'static str {
        match self {
            Backend::Etcd => "http",
            Backend::Redis => "redis",
        }
    }
}

/// A running store of either kind, killed on drop.
pub enum TestStore {
    Etcd(Etcd),
    Redis(Redis),
}

impl TestStore {
    /// Starts the store `EDGEMUX_TEST_STORE` names and returns once it serves.
    pub fn start() -> TestStore {
        let backend = Backend::from_env();
        eprintln!("cluster store: {backend:?}");
        match backend {
            Backend::Etcd => TestStore::Etcd(Etcd::start()),
            Backend::Redis => TestStore::Redis(Redis::start()),
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            TestStore::Etcd(_) => Backend::Etcd,
            TestStore::Redis(_) => Backend::Redis,
        }
    }

    /// The endpoint for `[cluster] endpoints`.
    pub fn endpoint(&self) -> &str {
        match self {
            TestStore::Etcd(e) => &e.endpoint,
            TestStore::Redis(r) => &r.endpoint,
        }
    }

    /// The store's process: to freeze (SIGSTOP), thaw or kill it.
    pub fn proc(&self) -> &Proc {
        match self {
            TestStore::Etcd(e) => &e.proc,
            TestStore::Redis(r) => &r.proc,
        }
    }

    /// Kills the store and starts an empty one at the same address.
    pub fn restart_empty(&mut self) {
        match self {
            TestStore::Etcd(e) => e.restart_empty(),
            TestStore::Redis(r) => r.restart_empty(),
        }
    }

    pub fn pid(&self) -> u32 {
        match self {
            TestStore::Etcd(e) => e.pid(),
            TestStore::Redis(r) => r.pid(),
        }
    }
}
