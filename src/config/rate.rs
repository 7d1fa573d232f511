//! A request rate, `N/s` or `N/m`: one grammar for the owners' `rate=` option and the operator's
//! `http.access.max_rate`.

/// Highest count a rate may have (per second or per minute).
pub const MAX_RATE: u32 = 100_000;

/// A request rate: `count` per second or per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub unit: RateUnit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateUnit {
    Second,
    Minute,
}

impl Rate {
    /// `N/s` or `N/m` with N from 1 to [`MAX_RATE`], digits only.
    pub fn parse(text: &str) -> Option<Rate> {
        let (n, unit) = text.split_once('/')?;
        let unit = match unit {
            "s" => RateUnit::Second,
            "m" => RateUnit::Minute,
            _ => return None,
        };
        if n.is_empty() || n.len() > 6 || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let count: u32 = n.parse().ok().filter(|c| (1..=MAX_RATE).contains(c))?;
        Some(Rate { count, unit })
    }

    /// Requests per second.
    pub fn per_second(self) -> f64 {
        match self.unit {
            RateUnit::Second => f64::from(self.count),
            RateUnit::Minute => f64::from(self.count) / 60.0,
        }
    }

    /// The burst a bucket holds: one second's worth, at least one request.
    pub fn burst(self) -> f64 {
        self.per_second().max(1.0)
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.unit {
            RateUnit::Second => "s",
            RateUnit::Minute => "m",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_strictly_and_print_back() {
        for ok in ["1/s", "30/m", "100000/s"] {
            assert_eq!(Rate::parse(ok).map(|r| r.to_string()).as_deref(), Some(ok));
        }
        for bad in [
            "", "5", "0/s", "100001/s", "+5/s", "5/h", "5/S", " 5/s", "5/s ", "lots",
        ] {
            assert_eq!(Rate::parse(bad), None, "{bad:?}");
        }
    }
}
