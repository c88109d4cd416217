//! Per-IP connect rate limit: a token bucket per source address.
//!
//! Pure logic with `now` passed in. The table is bounded: when it reaches its size limit,
//! buckets that have refilled completely (their IPs are quiet) are forgotten, and if that is
//! not enough, new IPs are let through unmetered rather than growing memory without bound.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::lifecycle::Millis;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Millis,
}

/// Token buckets keyed by IP.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    max_ips: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

impl RateLimiter {
    /// `per_sec` connects per second per IP with bursts of `burst`; at most `max_ips` tracked.
    /// `per_sec <= 0` disables the limit.
    pub fn new(per_sec: f64, burst: u32, max_ips: usize) -> Self {
        Self {
            per_sec,
            burst: f64::from(burst.max(1)),
            max_ips,
            buckets: HashMap::new(),
        }
    }

    /// Whether a connect from `ip` at `now` is allowed; takes a token if so.
    pub fn allow(&mut self, ip: IpAddr, now: Millis) -> bool {
        if self.per_sec <= 0.0 {
            return true;
        }
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.max_ips {
            self.forget_quiet(now);
            if self.buckets.len() >= self.max_ips {
                return true;
            }
        }
        let (per_sec, burst) = (self.per_sec, self.burst);
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_sub(b.updated) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * per_sec).min(burst);
        b.updated = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Seconds until `ip` may connect again (for `Retry-After`), at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        (1.0 / self.per_sec.max(f64::MIN_POSITIVE))
            .ceil()
            .clamp(1.0, 3600.0) as u64
    }

    fn forget_quiet(&mut self, now: Millis) {
        let (per_sec, burst) = (self.per_sec, self.burst);
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_sub(b.updated) as f64 / 1000.0;
            b.tokens + elapsed * per_sec < burst
        });
    }

    /// IPs tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn burst_then_refill() {
        let mut r = RateLimiter::new(2.0, 3, 10);
        assert!((0..3).all(|_| r.allow(ip(1), 0)));
        assert!(!r.allow(ip(1), 0));
        assert!(r.allow(ip(2), 0), "other IPs have their own bucket");
        assert!(!r.allow(ip(1), 400));
        assert!(
            r.allow(ip(1), 500),
            "half a second refills one token at 2/s"
        );
        assert!(!r.allow(ip(1), 500));
    }

    #[test]
    fn table_stays_bounded() {
        let mut r = RateLimiter::new(1.0, 1, 4);
        for n in 0..4 {
            assert!(r.allow(ip(n), 0));
        }
        // Full of IPs that are still limited: new IPs pass unmetered, nothing grows.
        assert!(r.allow(ip(9), 0));
        assert_eq!(r.tracked(), 4);
        // Once the old buckets refill, they are forgotten to make room.
        assert!(r.allow(ip(10), 5_000));
        assert_eq!(r.tracked(), 1);
    }

    #[test]
    fn zero_rate_disables() {
        let mut r = RateLimiter::new(0.0, 1, 1);
        assert!((0..100).all(|_| r.allow(ip(1), 0)));
        assert_eq!(r.tracked(), 0);
    }
}
