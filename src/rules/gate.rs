//! One SSH connection's rules as they become known. OpenSSH asks for its forwards before it
//! opens the session that carries the options, so a forward is registered with its gate
//! `Pending`, and requests wait until the options arrive (`Ready`), the grace passes with no
//! session (`Ready` with the defaults), or the options were refused (`Refused`: never served).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Rules, Upstream};

/// A gate settles within this after its connection's first forward (the SSH side's graces add
/// up to less), so a request never waits longer for a tunnel's rules.
pub const SETTLE_WITHIN: Duration = Duration::from_secs(6);

#[derive(Debug, Clone)]
pub enum GateState {
    Pending,
    Ready(Arc<Rules>),
    Refused,
}

#[derive(Debug)]
pub struct Gate(watch::Sender<GateState>);

impl Default for Gate {
    fn default() -> Self {
        Self(watch::Sender::new(GateState::Pending))
    }
}

impl Gate {
    /// Settles the gate; only the first settlement counts (the options cannot be changed once
    /// a tunnel is served). Returns whether this one did.
    pub fn settle(&self, state: GateState) -> bool {
        self.0.send_if_modified(|s| match s {
            GateState::Pending => {
                *s = state;
                !matches!(s, GateState::Pending)
            }
            _ => false,
        })
    }

    /// Settled with no rule at all, for HTTP (read without waiting or cloning).
    pub fn is_open(&self) -> bool {
        matches!(&*self.0.borrow(), GateState::Ready(rules) if rules.is_open() && rules.upstream != Upstream::Passthrough)
    }

    /// How the app is spoken to, once settled.
    pub fn upstream(&self) -> Option<Upstream> {
        match &*self.0.borrow() {
            GateState::Ready(rules) => Some(rules.upstream),
            _ => None,
        }
    }

    pub fn state(&self) -> GateState {
        self.0.borrow().clone()
    }

    /// The rules once known, waiting at most `limit`; `None` when refused or still pending.
    pub async fn ready(&self, limit: Duration) -> Option<Arc<Rules>> {
        // Nearly always settled already: no subscription, no timer.
        match &*self.0.borrow() {
            GateState::Ready(rules) => return Some(rules.clone()),
            GateState::Refused => return None,
            GateState::Pending => {}
        }
        let mut rx = self.0.subscribe();
        let settled = tokio::time::timeout(limit, rx.wait_for(|s| !matches!(s, GateState::Pending))).await;
        settled.ok().and_then(Result::ok).and_then(|state| match &*state {
            GateState::Ready(rules) => Some(rules.clone()),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn requests_wait_for_the_first_settlement_only() {
        let gate = Arc::new(Gate::default());
        assert!(
            gate.ready(Duration::from_millis(50)).await.is_none(),
            "pending: nothing yet"
        );
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.ready(Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        let rules = Rules {
            private: true,
            ..Rules::default()
        };
        assert!(gate.settle(GateState::Ready(Arc::new(rules))));
        assert!(waiter.await.ok().flatten().is_some_and(|r| r.private));
        assert!(
            !gate.settle(GateState::Ready(Arc::new(Rules::default()))),
            "settled once"
        );
        assert!(gate.ready(Duration::ZERO).await.is_some_and(|r| r.private));
        assert!(!gate.is_open(), "private is a rule");
        let open = Gate::default();
        assert!(!open.is_open(), "pending is not open");
        open.settle(GateState::Ready(Arc::new(Rules::default())));
        assert!(open.is_open());
        let refused = Gate::default();
        assert!(refused.settle(GateState::Refused));
        assert!(refused.ready(Duration::from_secs(1)).await.is_none());
    }
}
