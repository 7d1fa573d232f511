//! The replica's lease as a pure function of events to actions: no I/O, no clock. The etcd shell
//! performs each action, reports what came of it as the next event, and turns delays into time.
//!
//! Every entry this replica writes hangs on its one lease, so losing the lease loses them all: a
//! new lease is granted and the whole local state republished under it (SCALEOUT §3.3). A store
//! that stops answering does not end the lease: etcd keeps it for its TTL (and extends it across
//! leader changes), so the shell keeps trying the same lease until the store says it is gone.

/// Why a lease is granted (`edgemux_cluster_lease_grants_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GrantReason {
    /// This replica's first.
    Start,
    /// The lease ran out: the store was unreachable, or keepalives came late, for a whole TTL.
    Expired,
    /// The store no longer knew a lease that was kept alive in time: it was wiped or restored
    /// from a backup, or someone revoked the lease.
    StoreReset,
}

impl GrantReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Expired => "expired",
            Self::StoreReset => "store_reset",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseState {
    /// No lease: one is being granted.
    Granting(GrantReason),
    /// Kept alive.
    Held(i64),
    /// The store does not answer; the lease may well still live.
    Unreachable(i64),
    /// Revoked, or given up, at stop.
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseEvent {
    Granted(i64),
    /// A keepalive was answered with time left.
    KeptAlive,
    /// The store does not know the lease (a keepalive answered with no time left). `overdue`:
    /// no keepalive had succeeded for a whole TTL.
    Lost {
        overdue: bool,
    },
    /// A request failed or timed out.
    StoreDown,
    /// The store answers again (another task got through).
    StoreUp,
    Stop,
}

/// When to do an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delay {
    Now,
    /// After `keepalive_interval`.
    Interval,
    /// After the retry backoff.
    Backoff,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseAction {
    Grant {
        reason: GrantReason,
        after: Delay,
    },
    /// A new lease: write the replica record, then every local route, under it; then keep it
    /// alive.
    Republish(i64),
    KeepAlive {
        id: i64,
        after: Delay,
    },
    Revoke(i64),
    /// Stopped: nothing more to do. Every other state always has a next action, since the shell
    /// performs one action at a time and waits for what comes of it.
    Done,
}

/// The state and first action of a replica that starts.
pub(crate) fn start() -> (LeaseState, LeaseAction) {
    let reason = GrantReason::Start;
    (
        LeaseState::Granting(reason),
        LeaseAction::Grant {
            reason,
            after: Delay::Now,
        },
    )
}

/// One transition. An event that does not fit the state (an answer about a lease given up) is
/// passed over: the state goes on with its routine.
pub(crate) fn step(state: LeaseState, event: LeaseEvent) -> (LeaseState, LeaseAction) {
    use LeaseAction as A;
    use LeaseEvent as E;
    use LeaseState as S;
    let grant = |reason, after| (S::Granting(reason), A::Grant { reason, after });
    match (state, event) {
        (S::Stopped, _) => (S::Stopped, A::Done),
        (S::Held(id) | S::Unreachable(id), E::Stop) => (S::Stopped, A::Revoke(id)),
        (S::Granting(_), E::Stop) => (S::Stopped, A::Done),

        (S::Granting(_), E::Granted(id)) => (S::Held(id), A::Republish(id)),
        (S::Granting(reason), E::StoreDown) => grant(reason, Delay::Backoff),
        (S::Granting(reason), E::StoreUp) => grant(reason, Delay::Now),
        (S::Granting(reason), E::KeptAlive | E::Lost { .. }) => grant(reason, Delay::Backoff),

        (S::Held(id), E::KeptAlive) => (
            S::Held(id),
            A::KeepAlive {
                id,
                after: Delay::Interval,
            },
        ),
        (S::Held(_), E::Lost { overdue: true }) => grant(GrantReason::Expired, Delay::Now),
        (S::Held(_), E::Lost { overdue: false }) => grant(GrantReason::StoreReset, Delay::Now),
        (S::Held(id), E::StoreDown) => (
            S::Unreachable(id),
            A::KeepAlive {
                id,
                after: Delay::Backoff,
            },
        ),
        (S::Held(id), E::StoreUp | E::Granted(_)) => (
            S::Held(id),
            A::KeepAlive {
                id,
                after: Delay::Interval,
            },
        ),

        (S::Unreachable(id), E::KeptAlive) => (
            S::Held(id),
            A::KeepAlive {
                id,
                after: Delay::Interval,
            },
        ),
        // The outage outlived the lease.
        (S::Unreachable(_), E::Lost { .. }) => grant(GrantReason::Expired, Delay::Now),
        (S::Unreachable(id), E::StoreDown) => (
            S::Unreachable(id),
            A::KeepAlive {
                id,
                after: Delay::Backoff,
            },
        ),
        (S::Unreachable(id), E::StoreUp) => (
            S::Unreachable(id),
            A::KeepAlive {
                id,
                after: Delay::Now,
            },
        ),
        (S::Unreachable(id), E::Granted(_)) => (
            S::Unreachable(id),
            A::KeepAlive {
                id,
                after: Delay::Backoff,
            },
        ),
    }
}

impl LeaseState {
    /// The lease entries are written under, while it is believed alive.
    pub(crate) fn lease(self) -> Option<i64> {
        match self {
            Self::Held(id) | Self::Unreachable(id) => Some(id),
            Self::Granting(_) | Self::Stopped => None,
        }
    }

    /// Whether the store answers the lease's keepalives (`edgemux_cluster_store_up`).
    pub(crate) fn store_up(self) -> bool {
        matches!(self, Self::Held(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Delay::*;
    use GrantReason::*;
    use LeaseAction as A;
    use LeaseEvent as E;
    use LeaseState as S;

    #[test]
    fn every_transition() {
        let g = |reason, after| A::Grant { reason, after };
        let k = |id, after| A::KeepAlive { id, after };
        #[rustfmt::skip]
        let table = [
            (S::Granting(Start), E::Granted(7), S::Held(7), A::Republish(7)),
            (S::Granting(Start), E::StoreDown, S::Granting(Start), g(Start, Backoff)),
            (S::Granting(Expired), E::StoreUp, S::Granting(Expired), g(Expired, Now)),
            (S::Granting(Start), E::KeptAlive, S::Granting(Start), g(Start, Backoff)),
            (S::Granting(Start), E::Lost { overdue: true }, S::Granting(Start), g(Start, Backoff)),
            (S::Granting(Start), E::Stop, S::Stopped, A::Done),
            (S::Held(7), E::KeptAlive, S::Held(7), k(7, Interval)),
            (S::Held(7), E::Lost { overdue: true }, S::Granting(Expired), g(Expired, Now)),
            (S::Held(7), E::Lost { overdue: false }, S::Granting(StoreReset), g(StoreReset, Now)),
            (S::Held(7), E::StoreDown, S::Unreachable(7), k(7, Backoff)),
            (S::Held(7), E::StoreUp, S::Held(7), k(7, Interval)),
            (S::Held(7), E::Granted(8), S::Held(7), k(7, Interval)),
            (S::Held(7), E::Stop, S::Stopped, A::Revoke(7)),
            (S::Unreachable(7), E::KeptAlive, S::Held(7), k(7, Interval)),
            (S::Unreachable(7), E::Lost { overdue: false }, S::Granting(Expired), g(Expired, Now)),
            (S::Unreachable(7), E::StoreDown, S::Unreachable(7), k(7, Backoff)),
            (S::Unreachable(7), E::StoreUp, S::Unreachable(7), k(7, Now)),
            (S::Unreachable(7), E::Granted(8), S::Unreachable(7), k(7, Backoff)),
            (S::Unreachable(7), E::Stop, S::Stopped, A::Revoke(7)),
            (S::Stopped, E::Granted(9), S::Stopped, A::Done),
            (S::Stopped, E::Stop, S::Stopped, A::Done),
        ];
        for (state, event, next, action) in table {
            assert_eq!(step(state, event), (next, action), "{state:?} + {event:?}");
        }
    }

    #[test]
    fn a_store_outage_longer_than_the_lease_ends_in_a_republish() {
        let (mut s, a) = start();
        assert_eq!(
            a,
            A::Grant {
                reason: Start,
                after: Now
            }
        );
        assert!(!s.store_up() && s.lease().is_none());
        let mut actions = Vec::new();
        for e in [
            E::Granted(1),
            E::KeptAlive,
            E::StoreDown,
            E::StoreDown,
            E::StoreUp,
            E::Lost { overdue: true },
            E::Granted(2),
        ] {
            let (next, action) = step(s, e);
            s = next;
            actions.push(action);
        }
        assert_eq!(
            actions,
            [
                A::Republish(1),
                A::KeepAlive {
                    id: 1,
                    after: Interval
                },
                A::KeepAlive {
                    id: 1,
                    after: Backoff
                },
                A::KeepAlive {
                    id: 1,
                    after: Backoff
                },
                A::KeepAlive { id: 1, after: Now },
                A::Grant {
                    reason: Expired,
                    after: Now
                },
                A::Republish(2),
            ]
        );
        assert_eq!((s.lease(), s.store_up()), (Some(2), true));
        assert_eq!(Expired.as_str(), "expired");
    }
}
