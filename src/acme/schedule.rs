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

/// Orders placed and validations failed, within the windows their limits count over.
#[derive(Debug, Default)]
pub(crate) struct Budget {
    limits: Limits,
    /// Every order of the last week.
    orders: VecDeque<SystemTime>,
    /// The on-demand ones among `orders`.
    on_demand: VecDeque<SystemTime>,
    /// Failures of the last hour, by host; a host whose failures have all aged out is dropped,
    /// so the map holds no more hosts than orders were placed in an hour.
    failures: HashMap<String, VecDeque<SystemTime>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    HourlyOrders,
    WeeklyOrders,
    /// On-demand orders used their share of the week; the rest is the configured domains'.
    OnDemandOrders,
    HostFailures,
}

impl Budget {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Default::default()
        }
    }

    /// Takes one order from the budget for `host` (an `on_demand` one for a tunnel host, else a
    /// configured domain), or says which limit refuses it.
    pub(crate) fn try_order(&mut self, host: &str, on_demand: bool, now: SystemTime) -> Result<(), Refusal> {
        prune(&mut self.orders, now, WEEK);
        prune(&mut self.on_demand, now, WEEK);
        self.forget_old_failures(now);
        let failures = self.failures.get(host).map_or(0, VecDeque::len);
        if failures >= self.limits.failures_per_host_per_hour {
            return Err(Refusal::HostFailures);
        }
        if self.orders.len() >= self.limits.orders_per_week {
            return Err(Refusal::WeeklyOrders);
        }
        if on_demand && self.on_demand.len() >= self.limits.on_demand_orders_per_week {
            return Err(Refusal::OnDemandOrders);
        }
        let last_hour = self.orders.iter().filter(|t| within(**t, now, HOUR)).count();
        if last_hour >= self.limits.orders_per_hour {
            return Err(Refusal::HourlyOrders);
        }
        self.orders.push_back(now);
        if on_demand {
            self.on_demand.push_back(now);
        }
        Ok(())
    }

    pub(crate) fn record_failure(&mut self, host: &str, now: SystemTime) {
        self.forget_old_failures(now);
        self.failures.entry(host.to_owned()).or_default().push_back(now);
    }

    fn forget_old_failures(&mut self, now: SystemTime) {
        self.failures.retain(|_, times| {
            prune(times, now, HOUR);
            !times.is_empty()
        });
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
            on_demand_orders_per_week: 3,
            failures_per_host_per_hour: 2,
        };
        let mut b = Budget::new(limits);
        assert!(b.try_order("a", false, t0).is_ok());
        assert!(b.try_order("b", false, t0).is_ok());
        assert_eq!(b.try_order("c", false, t0), Err(Refusal::HourlyOrders));
        assert!(b.try_order("c", false, t0 + HOUR).is_ok());
        assert_eq!(b.try_order("d", false, t0 + HOUR * 2), Err(Refusal::WeeklyOrders));
        assert!(
            b.try_order("d", false, t0 + WEEK + HOUR).is_ok(),
            "old orders leave the week"
        );
        b.record_failure("x", t0 + WEEK + HOUR);
        b.record_failure("x", t0 + WEEK + HOUR);
        assert_eq!(
            b.try_order("x", false, t0 + WEEK + HOUR),
            Err(Refusal::HostFailures)
        );
        assert!(
            b.try_order("x", false, t0 + WEEK + HOUR * 3).is_ok(),
            "failures age out after an hour"
        );
    }

    #[test]
    fn on_demand_orders_never_use_the_configured_domains_share() {
        let t0 = SystemTime::UNIX_EPOCH + DAY * 1000;
        let limits = Limits {
            orders_per_hour: 100,
            orders_per_week: 5,
            on_demand_orders_per_week: 3,
            failures_per_host_per_hour: 4,
        };
        let mut b = Budget::new(limits);
        for i in 0..3 {
            assert!(b.try_order(&format!("t{i}.gw.test"), true, t0).is_ok());
        }
        assert_eq!(
            b.try_order("t3.gw.test", true, t0),
            Err(Refusal::OnDemandOrders),
            "random tunnel names stop at their share"
        );
        assert!(b.try_order("gw.test", false, t0).is_ok(), "the reserve is there");
        assert!(b.try_order("api.gw.test", false, t0).is_ok());
        assert_eq!(b.try_order("gw.test", false, t0), Err(Refusal::WeeklyOrders));
        assert!(
            b.try_order("t3.gw.test", true, t0 + WEEK).is_ok(),
            "the share comes back with the week"
        );
    }

    #[test]
    fn hosts_whose_failures_aged_out_are_forgotten() {
        let t0 = SystemTime::UNIX_EPOCH + DAY * 1000;
        let mut b = Budget::new(Limits::default());
        for i in 0..1000 {
            b.record_failure(&format!("t{i}.gw.test"), t0);
        }
        assert_eq!(b.failures.len(), 1000);
        for i in 0..10 {
            // Refused or not, an order never leaves an entry for a host without failures.
            let _ = b.try_order(&format!("new{i}.gw.test"), true, t0 + HOUR / 2);
        }
        assert_eq!(b.failures.len(), 1000, "failures within the hour are kept");
        b.record_failure("late.gw.test", t0 + HOUR);
        assert_eq!(
            b.failures.keys().collect::<Vec<_>>(),
            ["late.gw.test"],
            "only the failure of the last hour is left"
        );
        assert!(b.try_order("late.gw.test", true, t0 + HOUR * 2).is_ok());
        assert!(b.failures.is_empty());
    }
}
