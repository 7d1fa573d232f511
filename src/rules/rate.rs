//! A token bucket per tunnel: `rate` requests per second on average, a burst of one second's
//! worth. The clock is passed in, so the decision stays testable without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Rate;

#[derive(Debug)]
pub struct Bucket {
    per_second: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    pub fn new(rate: Rate, now: Instant) -> Self {
        Self {
            per_second: rate.per_second(),
            burst: rate.burst(),
            state: Mutex::new((rate.burst(), now)),
        }
    }

    /// Takes one request's token, or says how long until one is there.
    pub fn take(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = &mut *state;
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.per_second).min(self.burst);
        *last = now.max(*last);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::rules::RateUnit;

    #[test]
    fn a_burst_passes_then_waits_then_refills() {
        let t0 = Instant::now();
        let b = Bucket::new(
            Rate {
                count: 5,
                unit: RateUnit::Second,
            },
            t0,
        );
        let passed = (0..50).filter(|_| b.take(t0).is_ok()).count();
        assert_eq!(passed, 5);
        let wait = b.take(t0).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(200),
            "{wait:?}"
        );
        assert!(
            b.take(t0 + Duration::from_millis(200)).is_ok(),
            "one token after 1/5 s"
        );
        let later = t0 + Duration::from_secs(10);
        assert_eq!(
            (0..50).filter(|_| b.take(later).is_ok()).count(),
            5,
            "refills only to the burst"
        );
    }

    #[test]
    fn per_minute_rates_refill_slowly_with_a_burst_of_one() {
        let t0 = Instant::now();
        let b = Bucket::new(
            Rate {
                count: 30,
                unit: RateUnit::Minute,
            },
            t0,
        );
        assert!(b.take(t0).is_ok());
        let wait = b.take(t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(1900) && wait <= Duration::from_secs(2),
            "{wait:?}"
        );
        assert!(b.take(t0 + Duration::from_secs(2)).is_ok());
    }
}
