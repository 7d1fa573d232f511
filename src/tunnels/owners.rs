//! Which full key owns each key id. Host names carry only the short id (40 bits), so the first
//! key that opens a tunnel under an id claims it, and from then on another key whose id
//! collides is refused, even while the owner is offline. Claims are kept in a file under the
//! state directory so they outlive sessions and restarts (and, later, what a cluster shares).
//!
//! The file is append-only text, one `<keyid> <SHA256:…>` line per claim, compacted when it has
//! grown to twice the live entries. At most [`MAX_OWNERS`] ids are remembered; past that the
//! least recently used claim is forgotten (memory stays bounded however many keys an open
//! gateway sees; evicting a live user's claim would take that many fresh keys, each logging in
//! and opening a tunnel, on top of a 2^40 collision).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::names::{is_key_id, KeyFingerprint};
use crate::secret_file;

/// Claims kept in memory: ~100 bytes each, so at most ~10 MiB.
const MAX_OWNERS: usize = 100_000;

/// Why a key may not use a key id. (The message, shown to the refused client, does not name
/// the owner.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key id {key_id} belongs to another key whose id is the same; use another key")]
pub(crate) struct Claimed {
    pub(crate) key_id: String,
    pub(crate) owner: KeyFingerprint,
}

#[derive(Debug)]
pub(crate) struct KeyOwners {
    /// Where claims are kept; `None` keeps them in memory only (tests).
    file: Option<PathBuf>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Key id → its owner and when it was last used (a tick, for eviction).
    owners: HashMap<String, (KeyFingerprint, u64)>,
    tick: u64,
    /// Lines in the file, to know when to compact it.
    lines: usize,
}

impl KeyOwners {
    /// Claims from `file`, if it exists; unreadable lines are skipped and counted in the log.
    pub(crate) fn load(file: &Path) -> std::io::Result<Self> {
        let mut state = State::default();
        match std::fs::read_to_string(file) {
            Ok(text) => {
                let mut bad = 0usize;
                for line in text.lines() {
                    state.lines += 1;
                    match parse_line(line) {
                        Some((id, key)) => state.remember(id, key),
                        None => bad += 1,
                    }
                }
                if bad > 0 {
                    tracing::warn!(path = %file.display(), bad, "key id claims: unreadable lines skipped");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Self {
            file: Some(file.to_owned()),
            state: Mutex::new(state),
        })
    }

    #[cfg(test)]
    pub(crate) fn in_memory() -> Self {
        Self {
            file: None,
            state: Mutex::new(State::default()),
        }
    }

    /// Lets `key` use its key id: claims the id when nobody has, refuses when another key has.
    pub(crate) fn claim(&self, key: &KeyFingerprint) -> Result<(), Claimed> {
        let id = key.key_id();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.tick += 1;
        let tick = state.tick;
        match state.owners.get_mut(&id) {
            Some((owner, _)) if owner != key => {
                tracing::warn!(key_id = %id, %owner, refused = %key, "a key whose short id collides with another key's was refused");
                return Err(Claimed {
                    key_id: id,
                    owner: *owner,
                });
            }
            Some((_, used)) => {
                *used = tick;
                return Ok(());
            }
            None => {}
        }
        state.remember(id.clone(), *key);
        if let Some(file) = &self.file {
            if let Err(e) = state.persist(file, &id, key) {
                // The claim holds in memory; it is written again at the next compaction.
                tracing::warn!(path = %file.display(), error = %e, "cannot record a key id claim");
            }
        }
        Ok(())
    }
}

impl State {
    fn remember(&mut self, id: String, key: KeyFingerprint) {
        if self.owners.len() >= MAX_OWNERS && !self.owners.contains_key(&id) {
            let oldest = self.owners.iter().min_by_key(|(_, (_, used))| *used);
            if let Some(oldest) = oldest.map(|(id, _)| id.clone()) {
                self.owners.remove(&oldest);
            }
        }
        self.tick += 1;
        self.owners.insert(id, (key, self.tick));
    }

    /// Appends one claim, or rewrites the file from memory when it has grown twice too long.
    fn persist(&mut self, file: &Path, id: &str, key: &KeyFingerprint) -> std::io::Result<()> {
        if self.lines >= 2 * self.owners.len().max(1024) {
            let mut text = String::new();
            for (id, (key, _)) in &self.owners {
                text.push_str(&format!("{id} {key}\n"));
            }
            secret_file::write_secret(file, text.as_bytes())?;
            self.lines = self.owners.len();
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(file)?;
        f.write_all(format!("{id} {key}\n").as_bytes())?;
        self.lines += 1;
        Ok(())
    }
}

fn parse_line(line: &str) -> Option<(String, KeyFingerprint)> {
    let (id, key) = line.trim().split_once(' ')?;
    let key = KeyFingerprint::parse(key)?;
    (is_key_id(id) && key.key_id() == id).then(|| (id.to_owned(), key))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_colliding_key_is_refused_and_the_claim_outlives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key-owners");
        let owner = KeyFingerprint::from_sha256([3u8; 32]);
        let attacker = owner.colliding();
        let owners = KeyOwners::load(&file).unwrap();
        assert_eq!(owners.claim(&owner), Ok(()));
        assert_eq!(owners.claim(&owner), Ok(()), "the owner may come back");
        let refused = owners.claim(&attacker).unwrap_err();
        assert_eq!(refused.owner, owner);
        drop(owners);
        let again = KeyOwners::load(&file).unwrap();
        assert!(
            again.claim(&attacker).is_err(),
            "the owner is offline, the claim stays"
        );
        assert_eq!(again.claim(&KeyFingerprint::from_sha256([4u8; 32])), Ok(()));
    }

    #[test]
    fn bad_lines_are_skipped_and_a_line_must_match_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key-owners");
        let key = KeyFingerprint::from_sha256([5u8; 32]);
        assert_ne!(key.key_id(), "abcd2345");
        let forged = format!("abcd2345 {key}\n");
        std::fs::write(&file, format!("garbage\n{forged}{} {key}\n", key.key_id())).unwrap();
        let owners = KeyOwners::load(&file).unwrap();
        assert_eq!(owners.state.lock().unwrap().owners.len(), 1);
        assert!(owners.claim(&key.colliding()).is_err());
    }

    #[test]
    fn memory_stays_bounded() {
        let owners = KeyOwners::in_memory();
        let mut state = owners.state.lock().unwrap();
        for i in 0..(MAX_OWNERS + 10) {
            let mut digest = [0u8; 32];
            digest[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let key = KeyFingerprint::from_sha256(digest);
            state.remember(key.key_id(), key);
        }
        assert_eq!(state.owners.len(), MAX_OWNERS);
    }
}
