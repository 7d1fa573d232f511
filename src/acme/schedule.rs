//! When to renew, how long to back off, and whether the order budget allows another order.
//! Pure functions of the time they are given, so they are tested without sleeping.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use crate::config::OrderLimits as Limits;

/// Renew once two thirds of the lifetime have passed (90-day certificates: 30 days before expiry).
pub(crate) fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    not_before + lifetime * 2 / 3
}

/// With ACME Renewal Information, a point inside the server's suggested window; `fraction` in
/// [0, 1) spreads clients over the window as RFC 9773 asks.
pub(crate) fn renew_in_window(start: SystemTime, end: SystemTime, fraction: f64) -> SystemTime {
    let width = end.duration_since(start).unwrap_or_default();
    start + width.mul_f64(fraction.clamp(0.0, 0.999))
}

/// First retry after a failed order, doubling each time up to the cap.
pub(crate) const BACKOFF_START: Duration = Duration::from_secs(60);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(6 * 3600);

/// Exponential backoff with ±25 % jitter (`jitter` in [0, 1)).
pub(crate) fn backoff(failures: u32, jitter: f64) -> Duration {
    let base = BACKOFF_START
        .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(16)))
        .min(BACKOFF_MAX);
    base.mul_f64(0.75 + 0.5 * jitter.clamp(0.0, 1.0))
}

const HOUR: Duration = Duration::from_secs(3600);
const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Default)]
pub(crate) struct Budget {
    limits: Limits,
    orders: VecDeque<SystemTime>,
    failures: HashMap<String, VecDeque<SystemTime>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    HourlyOrders,
    WeeklyOrders,
    HostFailures,
}

impl Budget {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Default::default()
        }
    }

    /// Takes one order from the budget for `host`, or says which limit refuses it.
    pub(crate) fn try_order(&mut self, host: &str, now: SystemTime) -> Result<(), Refusal> {
        prune(&mut self.orders, now, WEEK);
        let failures = self.failures.entry(host.to_owned()).or_default();
        prune(failures, now, HOUR);
        if failures.len() >= self.limits.failures_per_host_per_hour {
            return Err(Refusal::HostFailures);
        }
        if self.orders.len() >= self.limits.orders_per_week {
            return Err(Refusal::WeeklyOrders);
        }
        let last_hour = self.orders.iter().filter(|t| within(**t, now, HOUR)).count();
        if last_hour >= self.limits.orders_per_hour {
            return Err(Refusal::HourlyOrders);
        }
        self.orders.push_back(now);
        Ok(())
    }

    pub(crate) fn record_failure(&mut self, host: &str, now: SystemTime) {
        self.failures.entry(host.to_owned()).or_default().push_back(now);
    }
}

fn within(t: SystemTime, now: SystemTime, window: Duration) -> bool {
    now.duration_since(t).map(|age| age < window).unwrap_or(true)
}

fn prune(times: &mut VecDeque<SystemTime>, now: SystemTime, window: Duration) {
    while times.front().is_some_and(|t| !within(*t, now, window)) {
        times.pop_front();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn renewal_at_two_thirds() {
        let nb = SystemTime::UNIX_EPOCH + DAY * 1000;
        assert_eq!(renew_at(nb, nb + DAY * 90), nb + DAY * 60);
        assert_eq!(renew_at(nb, nb), nb, "a zero lifetime renews at once");
        assert_eq!(
            renew_at(nb + DAY, nb),
            nb + DAY,
            "a backwards validity does not panic"
        );
        assert_eq!(renew_in_window(nb, nb + DAY, 0.5), nb + DAY / 2);
        assert!(renew_in_window(nb, nb + DAY, 7.0) < nb + DAY);
    }

    #[test]
    fn backoff_doubles_with_bounded_jitter() {
        assert_eq!(backoff(1, 0.5), BACKOFF_START);
        assert_eq!(backoff(2, 0.5), BACKOFF_START * 2);
        assert_eq!(backoff(3, 0.0), BACKOFF_START * 4 * 3 / 4);
        assert_eq!(backoff(100, 0.5), BACKOFF_MAX);
        assert!(backoff(100, 1.0) <= BACKOFF_MAX * 5 / 4);
    }

    #[test]
    fn budget_limits() {
        let t0 = SystemTime::UNIX_EPOCH + DAY * 1000;
        let limits = Limits {
            orders_per_hour: 2,
            orders_per_week: 3,
            failures_per_host_per_hour: 2,
        };
        let mut b = Budget::new(limits);
        assert!(b.try_order("a", t0).is_ok());
        assert!(b.try_order("b", t0).is_ok());
        assert_eq!(b.try_order("c", t0), Err(Refusal::HourlyOrders));
        assert!(b.try_order("c", t0 + HOUR).is_ok());
        assert_eq!(b.try_order("d", t0 + HOUR * 2), Err(Refusal::WeeklyOrders));
        assert!(
            b.try_order("d", t0 + WEEK + HOUR).is_ok(),
            "old orders leave the week"
        );
        b.record_failure("x", t0 + WEEK + HOUR);
        b.record_failure("x", t0 + WEEK + HOUR);
        assert_eq!(b.try_order("x", t0 + WEEK + HOUR), Err(Refusal::HostFailures));
        assert!(
            b.try_order("x", t0 + WEEK + HOUR * 3).is_ok(),
            "failures age out after an hour"
        );
    }
}
