//! Freshness and replay of peer headers, pure: the caller passes the time. A header is fresh when
//! its timestamp is within [`CLOCK_WINDOW_MS`] of now, and new when its (timestamp, nonce) has not
//! been seen. Both are covered by the HMAC, so a replay carries the very same pair, and a pair
//! can be forgotten once its timestamp has left the window: the clock check refuses it then.

use std::collections::BTreeSet;

use super::codec::NONCE_LEN;

/// How far a header's timestamp may be from our clock (SCALEOUT §3.4, "HMAC clock window").
pub(crate) const CLOCK_WINDOW_MS: u64 = 60_000;
/// The most (timestamp, nonce) pairs remembered. A pair stays up to two windows (a timestamp a
/// minute ahead is fresh for two minutes), so this allows about 1,000 new peer streams a second,
/// each a TLS handshake, more than two cores can accept; about 5 MiB when full. Past it, new
/// streams are refused as busy rather than remembered less.
pub(crate) const MAX_NONCES: usize = 131_072;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Stale {
    #[error("timestamp outside the clock window")]
    Clock,
    #[error("nonce already seen")]
    Replay,
    #[error("too many recent nonces to remember another")]
    Full,
}

impl Stale {
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::Clock => "clock",
            Self::Replay => "replay",
            Self::Full => "full",
        }
    }
}

/// The (timestamp, nonce) pairs seen within the window, oldest first.
#[derive(Debug)]
pub(crate) struct NonceCache {
    seen: BTreeSet<(u64, [u8; NONCE_LEN])>,
    window_ms: u64,
    capacity: usize,
}

impl Default for NonceCache {
    fn default() -> Self {
        Self::new(CLOCK_WINDOW_MS, MAX_NONCES)
    }
}

impl NonceCache {
    pub(crate) fn new(window_ms: u64, capacity: usize) -> Self {
        Self {
            seen: BTreeSet::new(),
            window_ms,
            capacity,
        }
    }

    /// Accepts a header stamped `timestamp_ms` with `nonce` at `now_ms`, once.
    pub(crate) fn check(
        &mut self,
        timestamp_ms: u64,
        nonce: &[u8; NONCE_LEN],
        now_ms: u64,
    ) -> Result<(), Stale> {
        if timestamp_ms.abs_diff(now_ms) > self.window_ms {
            return Err(Stale::Clock);
        }
        while let Some(&(oldest, _)) = self.seen.first() {
            if oldest.saturating_add(self.window_ms) >= now_ms {
                break;
            }
            self.seen.pop_first();
        }
        if self.seen.contains(&(timestamp_ms, *nonce)) {
            return Err(Stale::Replay);
        }
        if self.seen.len() >= self.capacity {
            return Err(Stale::Full);
        }
        self.seen.insert((timestamp_ms, *nonce));
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    #[test]
    fn a_header_is_accepted_once_within_the_window() {
        let mut cache = NonceCache::default();
        assert_eq!(cache.check(NOW, &[1; 16], NOW), Ok(()));
        assert_eq!(cache.check(NOW, &[1; 16], NOW + 5), Err(Stale::Replay));
        assert_eq!(cache.check(NOW, &[2; 16], NOW), Ok(()), "another nonce");
        assert_eq!(cache.check(NOW + 1, &[1; 16], NOW), Ok(()), "another time");
        let edge = CLOCK_WINDOW_MS;
        assert_eq!(cache.check(NOW - edge, &[3; 16], NOW), Ok(()));
        assert_eq!(cache.check(NOW + edge, &[4; 16], NOW), Ok(()));
        assert_eq!(cache.check(NOW - edge - 1, &[5; 16], NOW), Err(Stale::Clock));
        assert_eq!(cache.check(NOW + edge + 1, &[6; 16], NOW), Err(Stale::Clock));
        assert_eq!(cache.check(u64::MAX, &[7; 16], NOW), Err(Stale::Clock));
        assert_eq!(cache.check(0, &[7; 16], u64::MAX), Err(Stale::Clock));
    }

    #[test]
    fn a_replay_is_refused_for_as_long_as_its_timestamp_is_fresh() {
        let mut cache = NonceCache::default();
        let ahead = NOW + CLOCK_WINDOW_MS;
        cache.check(ahead, &[9; 16], NOW).unwrap();
        // Two windows later the pair is still remembered, then the clock refuses it.
        let last_fresh = ahead + CLOCK_WINDOW_MS;
        assert_eq!(cache.check(ahead, &[9; 16], last_fresh), Err(Stale::Replay));
        assert_eq!(cache.check(ahead, &[9; 16], last_fresh + 1), Err(Stale::Clock));
    }

    #[test]
    fn old_pairs_are_forgotten_and_the_cache_is_bounded() {
        let mut cache = NonceCache::new(CLOCK_WINDOW_MS, 3);
        for i in 0..3u8 {
            cache.check(NOW, &[i; 16], NOW).unwrap();
        }
        assert_eq!(cache.check(NOW, &[3; 16], NOW), Err(Stale::Full));
        assert_eq!(cache.check(NOW, &[0; 16], NOW), Err(Stale::Replay));
        // Once their timestamps leave the window, they make room.
        let later = NOW + CLOCK_WINDOW_MS + 1;
        assert_eq!(cache.check(later, &[3; 16], later), Ok(()));
        assert_eq!(cache.len(), 1);
    }
}
