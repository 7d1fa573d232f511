//! Which replica serves the next request for a pool whose members sit on several replicas. Pure:
//! the caller hands in the candidates with their member counts and a turn number (a per-pool
//! counter), and gets them back in the order to try.

use crate::config::Spread;

/// Where a pool's members are: here, or on another replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Local,
    Remote(String),
}

/// One place that holds members of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub(crate) target: Target,
    /// Members there (weights the share, so every member gets an equal one).
    pub(crate) members: u32,
    /// A replica that drains, or is ejected (`eject`), is tried only when nothing else is left.
    pub(crate) last: bool,
}

/// The candidates in the order to try for turn `turn`. With [`Spread::Even`] the first one is
/// picked so that over consecutive turns each candidate leads in proportion to its members; with
/// [`Spread::LocalFirst`] local members lead whenever there are any. The rest follow (the
/// fallbacks, tried only when the first refuses before any byte went upstream); draining or
/// ejected replicas and empty candidates come last.
pub(crate) fn order(candidates: &[Candidate], turn: u64, spread: Spread) -> Vec<Target> {
    let (mut live, mut last): (Vec<&Candidate>, Vec<&Candidate>) =
        candidates.iter().partition(|c| !c.last && c.members > 0);
    if live.is_empty() {
        std::mem::swap(&mut live, &mut last);
    }
    let local_first = spread == Spread::LocalFirst && live.iter().any(|c| c.target == Target::Local);
    let lead = if local_first {
        live.iter().position(|c| c.target == Target::Local)
    } else {
        weighted_pick(&live, turn)
    };
    let mut out = Vec::with_capacity(candidates.len());
    if let Some(i) = lead {
        out.push(live[i].target.clone());
        let rest = live.iter().enumerate().filter(|(j, _)| *j != i);
        out.extend(rest.map(|(_, c)| c.target.clone()));
    }
    out.extend(last.iter().map(|c| c.target.clone()));
    out
}

/// The candidate whose slice of `[0, total members)` holds `turn` modulo the total.
fn weighted_pick(live: &[&Candidate], turn: u64) -> Option<usize> {
    let total: u64 = live.iter().map(|c| u64::from(c.members.max(1))).sum();
    if total == 0 {
        return None;
    }
    let mut at = turn % total;
    for (i, c) in live.iter().enumerate() {
        let w = u64::from(c.members.max(1));
        if at < w {
            return Some(i);
        }
        at -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(target: Target, members: u32, last: bool) -> Candidate {
        Candidate {
            target,
            members,
            last,
        }
    }

    fn remote(rid: &str) -> Target {
        Target::Remote(rid.to_owned())
    }

    #[test]
    fn even_spread_gives_every_member_an_equal_share() {
        // One member here, two on r3: over many turns r3 leads twice as often.
        let c = [cand(Target::Local, 1, false), cand(remote("r3"), 2, false)];
        let leads: Vec<Target> = (0..300).map(|t| order(&c, t, Spread::Even)[0].clone()).collect();
        let local = leads.iter().filter(|t| **t == Target::Local).count();
        assert_eq!(local, 100);
        assert_eq!(leads.len() - local, 200);
        for t in 0..3 {
            assert_eq!(
                order(&c, t, Spread::Even).len(),
                2,
                "the other one is the fallback"
            );
        }
    }

    #[test]
    fn local_first_leads_with_local_members_when_there_are_any() {
        let c = [cand(remote("r2"), 5, false), cand(Target::Local, 1, false)];
        for t in 0..10 {
            assert_eq!(order(&c, t, Spread::LocalFirst), [Target::Local, remote("r2")]);
        }
        let only_remote = [cand(remote("r2"), 1, false), cand(remote("r3"), 1, false)];
        assert_eq!(order(&only_remote, 1, Spread::LocalFirst)[0], remote("r3"));
    }

    #[test]
    fn draining_or_ejected_replicas_come_last_and_serve_when_nothing_else_is_left() {
        let c = [cand(remote("r1"), 3, true), cand(remote("r3"), 1, false)];
        for t in 0..8 {
            assert_eq!(order(&c, t, Spread::Even), [remote("r3"), remote("r1")]);
        }
        let all_draining = [cand(remote("r1"), 1, true), cand(remote("r2"), 1, true)];
        assert_eq!(
            order(&all_draining, 0, Spread::Even),
            [remote("r1"), remote("r2")]
        );
        assert!(order(&[], 0, Spread::Even).is_empty());
    }
}
