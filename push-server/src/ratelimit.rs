//! Per-source limits on admission: a connect-rate token bucket and a counter (of handshakes
//! in progress, or of open connections) per source, keyed by [`source_key`].
//!
//! Pure logic with `now` passed in. Both tables are bounded:
//! - the rate limiter, when full, forgets buckets that have refilled completely (their
//!   sources are quiet), and if that is not enough evicts the least recently used eighth of
//!   the table. A new source is always metered: an evicted source starts again with a full
//!   burst, which gives an attacker nothing the many addresses filling the table did not
//!   give already, while letting new sources through unmetered (the old behaviour) gave
//!   every address past the bound an unlimited rate.
//! - a [`PerSource`] counter only holds sources with a count above zero, and each of those
//!   is capped, so it is bounded by what it counts (handshakes, connections).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

use crate::lifecycle::Millis;

/// The key a source address is limited by: an IPv4 address as is, an IPv6 address by its
/// /64 prefix (one subscriber, host or LAN gets a /64 and can pick any of its 2^64
/// addresses, so keying by /128 let one client have as many buckets as it liked). An
/// IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, from a dual-stack socket) is its IPv4 address.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Millis,
}

/// Token buckets keyed by [`source_key`].
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    max_ips: usize,
    buckets: HashMap<IpAddr, Bucket>,
    evicted: u64,
}

impl RateLimiter {
    /// `per_sec` connects per second per source with bursts of `burst`; at most `max_ips`
    /// sources tracked. `per_sec <= 0` disables the limit.
    pub fn new(per_sec: f64, burst: u32, max_ips: usize) -> Self {
        Self {
            per_sec,
            burst: f64::from(burst.max(1)),
            max_ips: max_ips.max(1),
            buckets: HashMap::new(),
            evicted: 0,
        }
    }

    /// Whether a connect from `ip` at `now` is allowed; takes a token if so.
    pub fn allow(&mut self, ip: IpAddr, now: Millis) -> bool {
        if self.per_sec <= 0.0 {
            return true;
        }
        let key = source_key(ip);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max_ips {
            self.make_room(now);
        }
        let (per_sec, burst) = (self.per_sec, self.burst);
        let b = self.buckets.entry(key).or_insert(Bucket {
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

    /// Seconds until a limited source may connect again (for `Retry-After`), at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        (1.0 / self.per_sec.max(f64::MIN_POSITIVE))
            .ceil()
            .clamp(1.0, 3600.0) as u64
    }

    /// Frees at least one place: quiet buckets first, then the least recently used eighth.
    /// One O(n) pass per n/8 new sources keeps the cost per connect constant on average.
    fn make_room(&mut self, now: Millis) {
        let (per_sec, burst) = (self.per_sec, self.burst);
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_sub(b.updated) as f64 / 1000.0;
            b.tokens + elapsed * per_sec < burst
        });
        if self.buckets.len() < self.max_ips {
            return;
        }
        let mut times: Vec<Millis> = self.buckets.values().map(|b| b.updated).collect();
        let n = (times.len() / 8).max(1);
        let (_, cutoff, _) = times.select_nth_unstable(n - 1);
        let cutoff = *cutoff;
        let before = self.buckets.len();
        self.buckets.retain(|_, b| b.updated > cutoff);
        self.evicted += (before - self.buckets.len()) as u64;
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    /// Buckets evicted (not quiet) to make room since start.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

/// A count per source with a cap (`0` disables it): handshakes in progress, or open
/// connections. Sources at zero are removed, so the table holds only active sources.
#[derive(Debug)]
pub struct PerSource {
    max: usize,
    counts: HashMap<IpAddr, usize>,
}

impl PerSource {
    /// At most `max` per source; `0`: no cap (nothing is tracked).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            counts: HashMap::new(),
        }
    }

    /// Counts one more for `ip`'s source unless it holds `max` already. A `true` must be
    /// matched by one [`PerSource::release`].
    pub fn acquire(&mut self, ip: IpAddr) -> bool {
        if self.max == 0 {
            return true;
        }
        let n = self.counts.entry(source_key(ip)).or_insert(0);
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives back one count taken by [`PerSource::acquire`].
    pub fn release(&mut self, ip: IpAddr) {
        if self.max == 0 {
            return;
        }
        let key = source_key(ip);
        if let Some(n) = self.counts.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.counts.remove(&key);
            }
        }
    }

    /// The count of `ip`'s source.
    pub fn count(&self, ip: IpAddr) -> usize {
        self.counts.get(&source_key(ip)).copied().unwrap_or(0)
    }

    /// Sources with a count above zero.
    pub fn tracked(&self) -> usize {
        self.counts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    fn v6(s: &str) -> IpAddr {
        s.parse().unwrap()
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
    fn ipv6_is_limited_by_its_64_prefix() {
        let mut r = RateLimiter::new(1.0, 2, 10);
        assert!(r.allow(v6("2001:db8:1:2::1"), 0));
        assert!(r.allow(v6("2001:db8:1:2:ffff::9"), 0));
        assert!(
            !r.allow(v6("2001:db8:1:2:abcd:1234:5678:9abc"), 0),
            "another address of the same /64 shares the bucket"
        );
        assert!(r.allow(v6("2001:db8:1:3::1"), 0), "the next /64 is its own");
        assert_eq!(r.tracked(), 2);
        assert_eq!(
            source_key(v6("::ffff:10.0.0.1")),
            IpAddr::from([10, 0, 0, 1])
        );
    }

    #[test]
    fn a_full_table_still_meters_new_sources() {
        let mut r = RateLimiter::new(1.0, 1, 4);
        for n in 0..4 {
            assert!(r.allow(ip(n), n.into()));
        }
        // Full of sources that are still limited: a new source is metered like any other,
        // by evicting the least recently used, and the table does not grow.
        assert!(r.allow(ip(9), 10));
        assert!(
            !r.allow(ip(9), 10),
            "a new source past the bound is limited"
        );
        assert_eq!(r.tracked(), 4);
        assert_eq!(r.evicted(), 1);
        assert!(!r.allow(ip(3), 10), "recently used buckets are kept");
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

    #[test]
    fn per_source_counts_are_capped_and_forgotten_at_zero() {
        let mut p = PerSource::new(2);
        assert!(p.acquire(ip(1)));
        assert!(p.acquire(ip(1)));
        assert!(!p.acquire(ip(1)));
        assert!(p.acquire(ip(2)));
        assert!(p.acquire(v6("2001:db8::1")));
        assert!(p.acquire(v6("2001:db8::2")));
        assert!(!p.acquire(v6("2001:db8::3")), "same /64");
        p.release(ip(1));
        assert!(p.acquire(ip(1)));
        for _ in 0..2 {
            p.release(ip(1));
            p.release(v6("2001:db8::9"));
        }
        p.release(ip(2));
        assert_eq!(p.tracked(), 0);
        let mut off = PerSource::new(0);
        assert!((0..1000).all(|_| off.acquire(ip(1))));
        assert_eq!(off.tracked(), 0);
    }
}
