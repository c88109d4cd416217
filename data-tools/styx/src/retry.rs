//! The retry policy: what a finished try leads to (Styx's rules, configurable per workflow).
//!
//! - exit 0 → `success`;
//! - exit 50 ("unrecoverable") → `stop`;
//! - total cost ≥ `max_cost` (50) → `stop`;
//! - exit 20 ("missing dependency", cost 0.1) → `retryAfter` 10 min;
//! - any other failure (cost 1) → `retryAfter` 3 min × a random integer in
//!   [1, 2^min(consecutive failures, 4)).
//!
//! The random draw comes from the caller's RNG so tests seed it.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::duration::iso;
use crate::state::{Event, RunState, State};

/// A workflow's retry policy. Every field has Styx's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// The exit code of success.
    pub success_exit_code: i32,
    /// The exit code meaning "my input is not there yet": retried after `missing_deps_delay`.
    pub missing_deps_exit_code: i32,
    /// Wait after a missing-dependency exit.
    #[serde(with = "iso")]
    pub missing_deps_delay: Duration,
    /// Cost of a missing-dependency exit (cheap: waiting for data is normal).
    pub missing_deps_cost: f64,
    /// The exit code meaning "retrying cannot help": the run stops at once.
    pub unrecoverable_exit_code: i32,
    /// Cost of any other failure (exit code, run error, timeout).
    pub failure_cost: f64,
    /// The unit of the failure backoff.
    #[serde(with = "iso")]
    pub backoff_base: Duration,
    /// The backoff multiplier is drawn from [1, 2^min(failures, this)): 4 caps the wait at
    /// 15 × the base (45 min by default), so a flaky job is still retried within the hour.
    pub backoff_max_exponent: u32,
    /// The run stops when its total cost reaches this: 50 failures, or 500 missing-dependency
    /// waits (about 3.5 days of 10-minute polls).
    pub max_cost: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            success_exit_code: 0,
            missing_deps_exit_code: 20,
            missing_deps_delay: Duration::from_secs(10 * 60),
            missing_deps_cost: 0.1,
            unrecoverable_exit_code: 50,
            failure_cost: 1.0,
            backoff_base: Duration::from_secs(3 * 60),
            backoff_max_exponent: 4,
            max_cost: 50.0,
        }
    }
}

impl RetryPolicy {
    /// What one try with this exit code adds to the run's cost.
    pub fn cost_of_exit(&self, code: i32) -> f64 {
        if code == self.success_exit_code {
            0.0
        } else if code == self.missing_deps_exit_code {
            self.missing_deps_cost
        } else {
            self.failure_cost
        }
    }

    /// The event that follows a `TERMINATED` or `FAILED` run; `None` in any other state.
    pub fn decide<R: Rng + ?Sized>(&self, run: &RunState, rng: &mut R) -> Option<Event> {
        if !matches!(run.state, State::Terminated | State::Failed) {
            return None;
        }
        let exit = run.last_exit;
        if run.state == State::Terminated && exit == Some(self.success_exit_code) {
            return Some(Event::Success);
        }
        if exit == Some(self.unrecoverable_exit_code) || run.retry_cost >= self.max_cost {
            return Some(Event::Stop);
        }
        let delay = if exit == Some(self.missing_deps_exit_code) {
            self.missing_deps_delay
        } else {
            let exponent = run.consecutive_failures.min(self.backoff_max_exponent);
            let upper = 1u64 << exponent;
            // [1, 1) is empty: with no failure counted yet the multiplier is 1.
            let factor = if upper > 1 {
                rng.random_range(1..upper)
            } else {
                1
            };
            self.backoff_base * factor as u32
        };
        Some(Event::RetryAfter {
            delay_millis: delay.as_millis() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn ended(state: State, exit: Option<i32>, failures: u32, cost: f64) -> RunState {
        let mut run = RunState::fresh(Utc::now());
        run.state = state;
        run.last_exit = exit;
        run.consecutive_failures = failures;
        run.retry_cost = cost;
        run
    }

    fn delay_of(e: Option<Event>) -> u64 {
        match e {
            Some(Event::RetryAfter { delay_millis }) => delay_millis,
            other => panic!("expected retryAfter, got {other:?}"),
        }
    }

    #[test]
    fn exit_codes_decide() {
        let p = RetryPolicy::default();
        let mut rng = StdRng::seed_from_u64(7);
        assert_eq!(
            p.decide(&ended(State::Terminated, Some(0), 0, 0.0), &mut rng),
            Some(Event::Success)
        );
        assert_eq!(
            p.decide(&ended(State::Terminated, Some(50), 1, 1.0), &mut rng),
            Some(Event::Stop)
        );
        assert_eq!(
            delay_of(p.decide(&ended(State::Terminated, Some(20), 0, 0.1), &mut rng)),
            600_000
        );
        assert_eq!(
            p.decide(&ended(State::Terminated, Some(20), 0, 50.0), &mut rng),
            Some(Event::Stop)
        );
        assert_eq!(
            p.decide(&ended(State::Terminated, Some(1), 3, 49.9), &mut rng)
                .map(|e| e.name()),
            Some("retryAfter")
        );
        assert_eq!(
            p.decide(&ended(State::Failed, None, 3, 50.0), &mut rng),
            Some(Event::Stop)
        );
        assert_eq!(
            p.decide(&ended(State::Running, None, 0, 0.0), &mut rng),
            None
        );
        // A runner error in FAILED is retried with backoff like a failed exit.
        assert_eq!(
            delay_of(p.decide(&ended(State::Failed, None, 1, 1.0), &mut rng)),
            180_000
        );
    }

    #[test]
    fn backoff_grows_with_failures_and_is_capped() {
        let p = RetryPolicy::default();
        let mut rng = StdRng::seed_from_u64(42);
        for failures in 1..=8u32 {
            let upper = 1u64 << failures.min(4);
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..400 {
                let d =
                    delay_of(p.decide(&ended(State::Terminated, Some(1), failures, 1.0), &mut rng));
                assert_eq!(d % 180_000, 0);
                let factor = d / 180_000;
                assert!(
                    (1..upper).contains(&factor),
                    "{failures} failures: factor {factor}"
                );
                seen.insert(factor);
            }
            // Every multiplier in the range shows up (400 draws from at most 15 values).
            assert_eq!(seen.len() as u64, upper - 1, "{failures} failures");
        }
    }

    #[test]
    fn seeded_rng_gives_the_same_delays() {
        let p = RetryPolicy::default();
        let run = ended(State::Terminated, Some(3), 4, 4.0);
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..10)
                .map(|_| delay_of(p.decide(&run, &mut rng)))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn policy_is_configurable() {
        let p = RetryPolicy {
            missing_deps_exit_code: 3,
            missing_deps_delay: Duration::from_secs(5),
            unrecoverable_exit_code: 9,
            max_cost: 2.0,
            ..RetryPolicy::default()
        };
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            delay_of(p.decide(&ended(State::Terminated, Some(3), 0, 0.1), &mut rng)),
            5_000
        );
        assert_eq!(
            p.decide(&ended(State::Terminated, Some(9), 0, 1.0), &mut rng),
            Some(Event::Stop)
        );
        assert_eq!(
            p.decide(&ended(State::Terminated, Some(1), 2, 2.0), &mut rng),
            Some(Event::Stop)
        );
        assert_eq!(p.cost_of_exit(3), 0.1);
    }
}
