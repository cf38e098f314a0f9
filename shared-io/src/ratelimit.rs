//! A rate limiter for repeated log lines: one line per period, and the line let through says
//! how many were held back, so a flood of the same warning costs one line a second and still
//! tells how big it was.
//!
//! Owns only that decision, as a pure function of `now`. It does not log, read the clock or
//! know what it limits: jitsu-dns limits its warnings about refused queries with it, synjitsu
//! its trace lines about dropped frames.

use std::time::{Duration, Instant};

/// At most one event per `period` goes through; the next one carries how many were held back.
#[derive(Debug, Clone)]
pub struct RateLimited {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    /// Lets one event through per `period`.
    pub fn new(period: Duration) -> RateLimited {
        RateLimited {
            period,
            last: None,
            suppressed: 0,
        }
    }

    /// The event at `now`: `Some(n)` if it goes through, `n` the events held back since the
    /// last one that did; `None` if it is held back (and counted).
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|l| now.saturating_duration_since(l) < self.period)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn one_event_per_period_goes_through_and_says_how_many_were_held_back() {
        let t0 = Instant::now();
        let mut r = RateLimited::new(SEC);
        assert_eq!(r.allow(t0), Some(0), "the first one goes through");
        assert_eq!(r.allow(t0 + SEC / 2), None);
        assert_eq!(r.allow(t0 + SEC * 9 / 10), None);
        assert_eq!(
            r.allow(t0 + SEC),
            Some(2),
            "a period later, with the two held back"
        );
        assert_eq!(r.allow(t0 + SEC * 3), Some(0), "the count starts again");
    }

    #[test]
    fn an_earlier_now_is_held_back_not_a_panic() {
        let t0 = Instant::now() + SEC;
        let mut r = RateLimited::new(SEC);
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0 - SEC / 2), None);
    }
}
