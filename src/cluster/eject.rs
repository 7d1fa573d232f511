//! Ejection of peers that cannot be reached (SCALEOUT §5): after [`FAILURES_TO_EJECT`]
//! consecutive failures to reach a replica it is *down*, and for a backoff that doubles with each
//! ejection ([`FIRST_BACKOFF`] up to [`MAX_BACKOFF`]) its members come last in every pool. It is
//! never left out: a host held only there is still tried (one dial, bounded by the peer connect
//! timeout) and answers 502 rather than 404. Once the backoff is over, the next request may try
//! it first again (the half-open probe); a failure then ejects it anew for twice as long, and any
//! answer from it, an OK or a refusal, brings it back.
//!
//! Pure: the caller hands in each outcome with the time it happened, and asks with the time now.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Consecutive failures that eject a replica: one failure may be a lost SYN or a restart.
pub(crate) const FAILURES_TO_EJECT: u32 = 2;
/// The first ejection's length: long enough that a pool stops paying a connect timeout on every
/// request, short enough that a replica back after a blip takes its share again soon.
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest ejection: a replica that healed is led with again within this.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What one attempt to reach a replica showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It answered, with OK or with a refusal (no route, busy, …): it is there.
    Answered,
    /// TCP, TLS or the connection failed before any answer, or the connect timed out.
    Unreachable,
    /// Nothing learned about the replica (our own bad request, a slow tunnel client).
    Unknown,
}

/// What an outcome changed, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    None,
    /// Ejected (again), for the given backoff.
    Ejected(Duration),
    /// Was down, answered: up again.
    Recovered,
}

/// One replica's record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Health {
    /// Consecutive failures since the last answer.
    failures: u32,
    /// Ejections since the last answer (the backoff doubles with each).
    ejections: u32,
    /// When the current ejection ends.
    until: Option<Instant>,
}

impl Health {
    fn down(&self) -> bool {
        self.failures >= FAILURES_TO_EJECT
    }

    fn backoff(&self) -> Duration {
        let doublings = self.ejections.min(16);
        FIRST_BACKOFF.saturating_mul(1 << doublings).min(MAX_BACKOFF)
    }

    fn record(&mut self, outcome: Outcome, now: Instant) -> Change {
        match outcome {
            Outcome::Unknown => Change::None,
            Outcome::Answered => {
                let was_down = self.down();
                *self = Health::default();
                if was_down {
                    Change::Recovered
                } else {
                    Change::None
                }
            }
            Outcome::Unreachable => {
                self.failures = self.failures.saturating_add(1);
                // A failure during the backoff (the replica tried as the last resort) changes
                // nothing: only the probe after it doubles the next one.
                let ejected = self.until.is_some_and(|until| now < until);
                if !self.down() || ejected {
                    return Change::None;
                }
                let backoff = self.backoff();
                self.ejections = self.ejections.saturating_add(1);
                self.until = Some(now + backoff);
                Change::Ejected(backoff)
            }
        }
    }
}

/// Every peer's record, by replica id (a new incarnation starts afresh).
#[derive(Debug, Default)]
pub(crate) struct Ejections {
    peers: HashMap<String, Health>,
}

impl Ejections {
    /// Records what an attempt to reach `rid` at `now` showed.
    pub(crate) fn record(&mut self, rid: &str, outcome: Outcome, now: Instant) -> Change {
        if outcome == Outcome::Unknown {
            return Change::None;
        }
        self.peers.entry(rid.to_owned()).or_default().record(outcome, now)
    }

    /// Whether `rid`'s members come last at `now`: it is ejected and its backoff is not over.
    pub(crate) fn is_ejected(&self, rid: &str, now: Instant) -> bool {
        self.peers
            .get(rid)
            .is_some_and(|h| h.down() && h.until.is_some_and(|until| now < until))
    }

    /// Whether `rid` is up: not down since its last answer (a replica on probation after its
    /// backoff is still down until it answers).
    pub(crate) fn is_up(&self, rid: &str) -> bool {
        self.peers.get(rid).is_none_or(|h| !h.down())
    }

    /// Forgets the replicas for which `keep` is false (they left the directory).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.peers.retain(|rid, _| keep(rid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::{Answered, Unknown, Unreachable};

    const R1: &str = "r1.a";

    /// One step: after `at` ms, `outcome`; then what is expected of the change, and whether r1
    /// is ejected and up just after.
    struct Step {
        at: u64,
        outcome: Outcome,
        change: Change,
        ejected: bool,
        up: bool,
    }

    fn step(at: u64, outcome: Outcome, change: Change, ejected: bool, up: bool) -> Step {
        Step {
            at,
            outcome,
            change,
            ejected,
            up,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn run(table: &[Step]) {
        let t0 = Instant::now();
        let mut e = Ejections::default();
        for (i, s) in table.iter().enumerate() {
            let now = t0 + Duration::from_millis(s.at);
            assert_eq!(e.record(R1, s.outcome, now), s.change, "step {i} change");
            assert_eq!(e.is_ejected(R1, now), s.ejected, "step {i} ejected");
            assert_eq!(e.is_up(R1), s.up, "step {i} up");
        }
    }

    #[test]
    fn two_consecutive_failures_eject_and_an_answer_resets() {
        run(&[
            step(0, Unreachable, Change::None, false, true),
            step(10, Unreachable, Change::Ejected(secs(1)), true, false),
            step(20, Answered, Change::Recovered, false, true),
            // The count started over.
            step(30, Unreachable, Change::None, false, true),
            step(40, Unreachable, Change::Ejected(secs(1)), true, false),
        ]);
    }

    #[test]
    fn refusals_and_unknown_outcomes_are_not_failures() {
        run(&[
            step(0, Unreachable, Change::None, false, true),
            // A NO_ROUTE or BUSY answer: the replica is there.
            step(10, Answered, Change::None, false, true),
            step(20, Unreachable, Change::None, false, true),
            // A slow tunnel client or our own bad request says nothing about the replica.
            step(30, Unknown, Change::None, false, true),
            step(40, Unreachable, Change::Ejected(secs(1)), true, false),
        ]);
    }

    #[test]
    fn failed_probes_double_the_backoff_up_to_the_cap() {
        let mut table = vec![
            step(0, Unreachable, Change::None, false, true),
            step(0, Unreachable, Change::Ejected(secs(1)), true, false),
            // Tried as the last resort during the backoff: nothing changes.
            step(500, Unreachable, Change::None, true, false),
        ];
        // Each probe after the backoff fails: 2, 4, 8, 16, 30, 30 s.
        let mut at = 1_000;
        for backoff in [2, 4, 8, 16, 30, 30] {
            table.push(step(at, Unreachable, Change::Ejected(secs(backoff)), true, false));
            at += backoff * 1_000;
        }
        run(&table);
    }

    #[test]
    fn after_the_backoff_the_replica_leads_again_but_stays_down_until_it_answers() {
        run(&[
            step(0, Unreachable, Change::None, false, true),
            step(0, Unreachable, Change::Ejected(secs(1)), true, false),
            // The backoff is over: no longer last, not yet up.
            step(1_000, Unknown, Change::None, false, false),
            step(1_200, Answered, Change::Recovered, false, true),
            // Recovered: the next ejection starts from the first backoff again.
            step(1_300, Unreachable, Change::None, false, true),
            step(1_400, Unreachable, Change::Ejected(secs(1)), true, false),
        ]);
    }

    #[test]
    fn replicas_are_independent_and_forgotten_when_they_leave() {
        let now = Instant::now();
        let mut e = Ejections::default();
        e.record(R1, Unreachable, now);
        e.record(R1, Unreachable, now);
        assert!(e.is_ejected(R1, now) && e.is_up("r3.c"));
        e.retain(|rid| rid != R1);
        assert!(!e.is_ejected(R1, now) && e.is_up(R1));
    }
}
