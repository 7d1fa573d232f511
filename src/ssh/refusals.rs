//! What one SSH connection has been refused, kept in constant space however many refusals a
//! client provokes: the first few are logged and kept for a session channel to show, the rest
//! only counted, and past [`MAX_REFUSALS_PER_CONN`] the connection is to be cut. Bookkeeping only:
//! the handler does the logging and the disconnecting.

/// Refusals logged (and shown on a session channel) one by one per connection; the rest are
/// summed up in one line when the connection is cut or ends. Enough for a client whose every
/// `-R` in a typical command line is refused to see why.
pub(super) const LOGGED_REFUSALS: u32 = 5;

/// Refused requests (global requests and channel opens) one connection may make before it is
/// disconnected. A client whose every forward is refused makes at most
/// `MAX_FORWARDS_PER_CONN` (64) of them per connection; twice that leaves room for cancels and
/// retries, and ends a flood after a few KiB of work (unbounded, 300,000 refused
/// `tcpip-forward`s in 3.6 s grew the gateway's RSS from 11 to 152 MB and wrote a 72 MB log).
pub(super) const MAX_REFUSALS_PER_CONN: u32 = 128;

/// What the handler does about one more refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// One of the first few: log it and show it to the client.
    Tell,
    /// Count it and say nothing.
    Quiet,
    /// The one that reached the cap: disconnect the client, once.
    Cut,
}

/// A connection's refusal count and the messages kept for a session channel.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    count: u32,
    /// Refusals that never cut the connection (see `note_uncapped`).
    uncapped: u32,
    /// Messages waiting for a session channel, at most `LOGGED_REFUSALS` of them.
    pending: Vec<String>,
}

impl Refusals {
    /// Counts one refusal (saturating) and says what to do about it.
    pub(super) fn note(&mut self) -> Verdict {
        self.count = self.count.saturating_add(1);
        if self.count <= LOGGED_REFUSALS {
            Verdict::Tell
        } else if self.count == MAX_REFUSALS_PER_CONN {
            Verdict::Cut
        } else {
            Verdict::Quiet
        }
    }

    /// Counts a refusal that never cuts the connection: an `ssh -L` to a tunnel that is down is
    /// retried by well-meaning clients for as long as it stays down, and costs nothing to refuse.
    /// True for the first few, which are logged.
    pub(super) fn note_uncapped(&mut self) -> bool {
        self.uncapped = self.uncapped.saturating_add(1);
        self.uncapped <= LOGGED_REFUSALS
    }

    /// Refusals so far, those that never cut aside.
    pub(super) fn count(&self) -> u32 {
        self.count
    }

    /// Refusals that never cut the connection, so far.
    pub(super) fn uncapped(&self) -> u32 {
        self.uncapped
    }

    /// Refusals of either kind that were not logged one by one.
    pub(super) fn unlogged(&self) -> u32 {
        let capped = self.count.saturating_sub(LOGGED_REFUSALS);
        capped.saturating_add(self.uncapped.saturating_sub(LOGGED_REFUSALS))
    }

    /// Whether the cap was reached: anything more is refused without a word.
    pub(super) fn is_cut(&self) -> bool {
        self.count >= MAX_REFUSALS_PER_CONN
    }

    /// Keeps `message` for a session channel opened later, if there is room.
    pub(super) fn keep(&mut self, message: String) {
        if self.pending.len() < LOGGED_REFUSALS as usize {
            self.pending.push(message);
        }
    }

    /// The kept messages, each once, then a line counting the rest.
    pub(super) fn take_messages(&mut self) -> Vec<String> {
        let mut messages = std::mem::take(&mut self.pending);
        let more = self.count.saturating_sub(LOGGED_REFUSALS);
        if !messages.is_empty() && more > 0 {
            messages.push(format!("{more} more requests refused"));
        }
        messages
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn the_first_few_are_told_the_cap_cuts_once_and_memory_stays_flat() {
        let mut r = Refusals::default();
        let verdicts: Vec<Verdict> = (0..10_000)
            .map(|i| {
                r.keep(format!("refusal {i}"));
                r.note()
            })
            .collect();
        let told = verdicts.iter().filter(|v| **v == Verdict::Tell).count();
        let cuts: Vec<usize> = (0..verdicts.len())
            .filter(|i| verdicts[*i] == Verdict::Cut)
            .collect();
        assert_eq!(told, LOGGED_REFUSALS as usize);
        assert_eq!(cuts, vec![MAX_REFUSALS_PER_CONN as usize - 1]);
        assert!(r.is_cut());
        assert_eq!(r.count(), 10_000);
        assert_eq!(r.pending.len(), LOGGED_REFUSALS as usize);
        let shown = r.take_messages();
        assert_eq!(shown.len(), LOGGED_REFUSALS as usize + 1);
        assert_eq!(shown[0], "refusal 0");
        assert_eq!(shown[LOGGED_REFUSALS as usize], "9995 more requests refused");
        assert!(r.take_messages().is_empty(), "shown twice");
    }

    #[test]
    fn uncapped_refusals_are_logged_a_few_times_and_never_cut() {
        let mut r = Refusals::default();
        let logged = (0..10_000).filter(|_| r.note_uncapped()).count();
        assert_eq!(logged, LOGGED_REFUSALS as usize);
        assert!(!r.is_cut());
        assert_eq!((r.count(), r.uncapped(), r.unlogged()), (0, 10_000, 9_995));
    }

    #[test]
    fn below_the_cap_nothing_is_cut() {
        let mut r = Refusals::default();
        for _ in 1..MAX_REFUSALS_PER_CONN {
            assert_ne!(r.note(), Verdict::Cut);
        }
        assert!(!r.is_cut());
        assert_eq!(r.note(), Verdict::Cut);
    }
}
