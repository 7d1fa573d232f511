//! Fencing, pure: whether a replica cut from the store takes itself out of service.
//!
//! A replica whose store has not served it for `fence_after` asks its peers (op `ping`) how the
//! store looks from there. Only a peer that says `store=up` is evidence that the fault is this
//! replica's link, not the store: then its routes have left the other replicas' copies, and its
//! tunnel clients are better served elsewhere. Peers that say `store=down`, or do not answer,
//! are no evidence at all, so a store-wide outage never fences anyone (SCALEOUT §3.5). A fenced
//! replica un-fences once the store serves it again (a lease kept alive, the watch following).
//! No I/O and no clock: the shell in `node` measures and asks.

use std::time::Duration;

/// What the peers answered to one round of pings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Answers {
    /// Peers whose store serves them.
    pub(crate) up: usize,
    /// Peers whose store does not serve them either.
    pub(crate) down: usize,
    /// Peers that did not answer (unreachable, refused, or too slow).
    pub(crate) silent: usize,
}

/// This replica's state as the shell sees it now.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Inputs {
    /// How long the store has not served this replica; `None` while it does.
    pub(crate) store_down_for: Option<Duration>,
    /// `[cluster] fence_after`; `None`: fencing is off.
    pub(crate) fence_after: Option<Duration>,
    /// The last round of pings; `None` when none was sent.
    pub(crate) answers: Option<Answers>,
    /// The round before, with the store not serving this replica either, heard a peer say `up`.
    /// Evidence counts only twice in a row: after a store-wide outage the replicas come back a
    /// moment apart, and the first one back says `up` to one whose watch is still reconnecting.
    pub(crate) heard_up_before: bool,
    pub(crate) fenced: bool,
}

/// What to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Fence,
    Unfence,
    Stay,
}

/// Whether the peers should be asked now: fencing is on, this replica is not fenced, and the
/// store has not served it for `fence_after`.
pub(crate) fn wants_answers(
    store_down_for: Option<Duration>,
    fence_after: Option<Duration>,
    fenced: bool,
) -> bool {
    match (store_down_for, fence_after) {
        (Some(down), Some(after)) => !fenced && down >= after,
        _ => false,
    }
}

/// The decision for `inputs`.
pub(crate) fn decide(inputs: Inputs) -> Decision {
    if inputs.fenced {
        // The store serves this replica again: its lease is kept alive (a new one, republished).
        return if inputs.store_down_for.is_none() {
            Decision::Unfence
        } else {
            Decision::Stay
        };
    }
    if !wants_answers(inputs.store_down_for, inputs.fence_after, inputs.fenced) {
        return Decision::Stay;
    }
    match inputs.answers {
        Some(a) if a.up > 0 && inputs.heard_up_before => Decision::Fence,
        _ => Decision::Stay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// What, down for, fence_after, answers, fenced, the decision.
    type Row = (
        &'static str,
        Option<Duration>,
        Option<Duration>,
        Option<Answers>,
        bool,
        Decision,
    );

    fn answers(up: usize, down: usize, silent: usize) -> Option<Answers> {
        Some(Answers { up, down, silent })
    }

    #[test]
    fn the_table() {
        use Decision::{Fence, Stay, Unfence};
        let on = Some(S(3));
        #[rustfmt::skip]
        let table: &[Row] = &[
            // what,                                 down for,    fence_after, answers,          fenced, decision
            ("store serves us",                      None,        on,          None,             false, Stay),
            ("store serves us, peers say up",        None,        on,          answers(2, 0, 0), false, Stay),
            ("down, not yet fence_after",            Some(S(2)),  on,          answers(2, 0, 0), false, Stay),
            ("store-wide outage: all say down",      Some(S(60)), on,          answers(0, 2, 0), false, Stay),
            ("store-wide outage: none answers",      Some(S(60)), on,          answers(0, 0, 2), false, Stay),
            ("no peers at all",                      Some(S(60)), on,          answers(0, 0, 0), false, Stay),
            ("not asked yet",                        Some(S(60)), on,          None,             false, Stay),
            ("one peer says up after fence_after",   Some(S(3)),  on,          answers(1, 0, 0), false, Fence),
            ("one up among down and silent",         Some(S(9)),  on,          answers(1, 1, 1), false, Fence),
            ("off never fences",                     Some(S(600)), None,       answers(2, 0, 0), false, Stay),
            ("fenced, still cut",                    Some(S(30)), on,          answers(2, 0, 0), true,  Stay),
            ("fenced, store-wide now",               Some(S(30)), on,          answers(0, 2, 0), true,  Stay),
            ("fenced, lease regained",               None,        on,          None,             true,  Unfence),
            ("fenced, lease regained, turned off",   None,        None,        None,             true,  Unfence),
        ];
        for &(what, store_down_for, fence_after, answers, fenced, want) in table {
            let inputs = Inputs {
                store_down_for,
                fence_after,
                answers,
                heard_up_before: true,
                fenced,
            };
            assert_eq!(decide(inputs), want, "{what}");
        }
    }

    #[test]
    fn a_first_up_is_not_enough() {
        let first = Inputs {
            store_down_for: Some(S(12)),
            fence_after: Some(S(3)),
            answers: answers(1, 0, 0),
            heard_up_before: false,
            fenced: false,
        };
        assert_eq!(
            decide(first),
            Decision::Stay,
            "one peer back first, this one reconnecting"
        );
        let again = Inputs {
            heard_up_before: true,
            ..first
        };
        assert_eq!(decide(again), Decision::Fence, "still cut a round later");
    }

    #[test]
    fn peers_are_asked_only_when_an_answer_could_fence() {
        let on = Some(S(3));
        assert!(!wants_answers(None, on, false));
        assert!(!wants_answers(Some(S(2)), on, false));
        assert!(wants_answers(Some(S(3)), on, false));
        assert!(!wants_answers(Some(S(3)), on, true), "already fenced");
        assert!(!wants_answers(Some(S(600)), None, false), "off");
    }
}
