//! The sampling engine: rules in Jaeger's file-based strategies format, a head-based
//! decision taken once at the root of a trace, and the strategy answer Jaeger's remote
//! sampling protocol serves to SDKs.
//!
//! Pure: the decision takes the trace ID and `now`, so rates are tested without clocks.
//!
//! The rules file is the one Jaeger's collector reads (`--sampling.strategies-file`):
//!
//! ```json
//! {"service_strategies": [
//!    {"service": "push-server", "type": "probabilistic", "param": 0.01,
//!     "operation_strategies": [{"operation": "POST /v1/push", "type": "probabilistic", "param": 0.5}]},
//!    {"service": "msg-processor", "type": "ratelimiting", "param": 20}],
//!  "default_strategy": {"type": "probabilistic", "param": 0.001}}
//! ```

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// A rule's kind.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyType {
    /// Keep `param` (0..=1) of traces, chosen by trace ID.
    Probabilistic,
    /// Keep at most `param` traces per second.
    Ratelimiting,
}

/// One rule: a type and its parameter.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OperationStrategy {
    /// Operation (span) name the rule applies to, e.g. `POST /v1/push`.
    pub operation: String,
    /// Kind of rule.
    #[serde(rename = "type")]
    pub kind: StrategyType,
    /// Probability (probabilistic) or traces per second (ratelimiting).
    pub param: f64,
}

/// A service's rules, or the default for services without their own.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceStrategy {
    /// Service name (`service.name` resource attribute); absent on the default strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Kind of the service-wide rule.
    #[serde(rename = "type")]
    pub kind: StrategyType,
    /// Its parameter.
    pub param: f64,
    /// Rules for single operations, which win over the service-wide rule.
    #[serde(default)]
    pub operation_strategies: Vec<OperationStrategy>,
}

/// The whole rules file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Strategies {
    /// Per-service rules.
    #[serde(default)]
    pub service_strategies: Vec<ServiceStrategy>,
    /// Rules for everything else. Jaeger's default when absent: probabilistic 0.001.
    #[serde(default = "default_strategy")]
    pub default_strategy: ServiceStrategy,
}

fn default_strategy() -> ServiceStrategy {
    ServiceStrategy {
        service: None,
        kind: StrategyType::Probabilistic,
        param: 0.001,
        operation_strategies: Vec::new(),
    }
}

impl Default for Strategies {
    fn default() -> Self {
        Self {
            service_strategies: Vec::new(),
            default_strategy: default_strategy(),
        }
    }
}

/// A rules file that cannot be used. The engine keeps its previous rules.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// Not JSON of the strategies format.
    #[error("sampling rules: {0}")]
    Parse(#[from] serde_json::Error),
    /// A probability outside 0..=1 or a negative rate.
    #[error("sampling rules: {what}: param {param} out of range ({range})")]
    Range {
        what: String,
        param: f64,
        range: &'static str,
    },
    /// The same service listed twice.
    #[error("sampling rules: service {0:?} listed twice")]
    DuplicateService(String),
    /// The default strategy names a service.
    #[error("sampling rules: default_strategy must not name a service")]
    NamedDefault,
}

impl Strategies {
    /// Parses and checks a rules file.
    pub fn parse(json: &str) -> Result<Self, RulesError> {
        let s: Strategies = serde_json::from_str(json)?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), RulesError> {
        if self.default_strategy.service.is_some() {
            return Err(RulesError::NamedDefault);
        }
        let mut seen = std::collections::HashSet::new();
        for s in self
            .service_strategies
            .iter()
            .chain(std::iter::once(&self.default_strategy))
        {
            let name = s
                .service
                .clone()
                .unwrap_or_else(|| "default_strategy".into());
            if s.service.is_some() && !seen.insert(name.clone()) {
                return Err(RulesError::DuplicateService(name));
            }
            check(&name, s.kind, s.param)?;
            for op in &s.operation_strategies {
                check(&format!("{name}/{}", op.operation), op.kind, op.param)?;
            }
        }
        Ok(())
    }

    /// Whether a rule names `service` (else the default applies to it).
    pub fn names(&self, service: &str) -> bool {
        self.service_strategies
            .iter()
            .any(|s| s.service.as_deref() == Some(service))
    }

    /// The rules that apply to `service`.
    pub fn for_service(&self, service: &str) -> &ServiceStrategy {
        self.service_strategies
            .iter()
            .find(|s| s.service.as_deref() == Some(service))
            .unwrap_or(&self.default_strategy)
    }

    /// The rule for one (service, operation): the operation's own, else the service's, else
    /// the default's operation rule, else the default.
    pub fn rule(&self, service: &str, operation: &str) -> (StrategyType, f64) {
        let s = self.for_service(service);
        let op = s
            .operation_strategies
            .iter()
            .chain(self.default_strategy.operation_strategies.iter())
            .find(|o| o.operation == operation);
        match op {
            Some(o) => (o.kind, o.param),
            None => (s.kind, s.param),
        }
    }

    /// Jaeger's remote-sampling answer for `service` (the JSON of `sampling.proto`'s
    /// `SamplingStrategyResponse`, with enum names), what `GET /sampling?service=` serves.
    /// Per-operation rules are probabilistic in that protocol: rate-limiting operation rules
    /// are enforced by our own engine only and left out of the answer.
    pub fn remote_response(&self, service: &str) -> serde_json::Value {
        let s = self.for_service(service);
        let mut answer = match s.kind {
            StrategyType::Probabilistic => serde_json::json!({
                "strategyType": "PROBABILISTIC",
                "probabilisticSampling": {"samplingRate": s.param},
            }),
            StrategyType::Ratelimiting => serde_json::json!({
                "strategyType": "RATE_LIMITING",
                "rateLimitingSampling": {"maxTracesPerSecond": s.param.round() as i64},
            }),
        };
        let ops: Vec<_> = s
            .operation_strategies
            .iter()
            .chain(self.default_strategy.operation_strategies.iter())
            .filter(|o| o.kind == StrategyType::Probabilistic)
            .map(|o| {
                serde_json::json!({
                    "operation": o.operation,
                    "probabilisticSampling": {"samplingRate": o.param},
                })
            })
            .collect();
        if !ops.is_empty() {
            let default_probability = match s.kind {
                StrategyType::Probabilistic => s.param,
                // A rate-limited service has no probability: fall back to the default's.
                StrategyType::Ratelimiting => match self.default_strategy.kind {
                    StrategyType::Probabilistic => self.default_strategy.param,
                    StrategyType::Ratelimiting => 0.001,
                },
            };
            answer["operationSampling"] = serde_json::json!({
                "defaultSamplingProbability": default_probability,
                "defaultLowerBoundTracesPerSecond": 0.0,
                "defaultUpperBoundTracesPerSecond": 0.0,
                "perOperationStrategies": ops,
            });
        }
        answer
    }
}

fn check(what: &str, kind: StrategyType, param: f64) -> Result<(), RulesError> {
    let ok = match kind {
        StrategyType::Probabilistic => (0.0..=1.0).contains(&param),
        StrategyType::Ratelimiting => param >= 0.0 && param.is_finite(),
    };
    if ok {
        Ok(())
    } else {
        Err(RulesError::Range {
            what: what.to_owned(),
            param,
            range: match kind {
                StrategyType::Probabilistic => "0..=1",
                StrategyType::Ratelimiting => ">= 0",
            },
        })
    }
}

/// True when `trace_id` falls under probability `p`. Uses the trace ID's low 8 bytes, which
/// W3C asks to be random, so every service that sees the same ID decides the same way.
pub fn probabilistic(trace_id: &[u8; 16], p: f64) -> bool {
    if p >= 1.0 {
        return true;
    }
    if p <= 0.0 {
        return false;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    let x = u64::from_be_bytes(low) >> 11; // 53 bits: exact in an f64
    (x as f64) < p * (1u64 << 53) as f64
}

/// A token bucket for rate-limiting rules, refilled by `now` (seconds, any origin).
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    tokens: f64,
    last: f64,
}

impl Bucket {
    fn new(rate: f64, now: f64) -> Self {
        // One second's worth to start with, and at least one trace.
        Self {
            rate,
            tokens: rate.max(1.0),
            last: now,
        }
    }

    fn take(&mut self, now: f64) -> bool {
        let elapsed = (now - self.last).max(0.0);
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The head-based decision at the root of a trace. Shared by all requests of a process; the
/// rules can be replaced while it runs ([`Sampler::set_rules`]), rate buckets restart then.
#[derive(Debug, Default)]
pub struct Sampler {
    inner: Mutex<SamplerState>,
}

#[derive(Debug, Default)]
struct SamplerState {
    rules: Strategies,
    buckets: HashMap<(String, String), Bucket>,
}

impl Sampler {
    /// A sampler with these rules.
    pub fn new(rules: Strategies) -> Self {
        Self {
            inner: Mutex::new(SamplerState {
                rules,
                buckets: HashMap::new(),
            }),
        }
    }

    /// Replaces the rules (a hot reload).
    pub fn set_rules(&self, rules: Strategies) {
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        state.rules = rules;
        state.buckets.clear();
    }

    /// The rules in force.
    pub fn rules(&self) -> Strategies {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rules
            .clone()
    }

    /// Whether a new trace rooted at (service, operation) is recorded. `now` in seconds.
    pub fn decide(&self, service: &str, operation: &str, trace_id: &[u8; 16], now: f64) -> bool {
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match state.rules.rule(service, operation) {
            (StrategyType::Probabilistic, p) => probabilistic(trace_id, p),
            (StrategyType::Ratelimiting, rate) => {
                // Bounded: one bucket per (service, operation) named in the rules or seen;
                // cleared on every reload. Operation names come from our own code, not users.
                state
                    .buckets
                    .entry((service.to_owned(), operation.to_owned()))
                    .or_insert_with(|| Bucket::new(rate, now))
                    .take(now)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    const RULES: &str = r#"{
      "service_strategies": [
        {"service": "push-server", "type": "probabilistic", "param": 0.2,
         "operation_strategies": [
            {"operation": "POST /v1/push", "type": "probabilistic", "param": 0.5},
            {"operation": "deliver", "type": "ratelimiting", "param": 10}]},
        {"service": "msg-processor", "type": "ratelimiting", "param": 5}
      ],
      "default_strategy": {"type": "probabilistic", "param": 0.01,
        "operation_strategies": [{"operation": "/healthz", "type": "probabilistic", "param": 0.0}]}
    }"#;

    fn ids(n: usize, seed: u64) -> Vec<[u8; 16]> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random()).collect()
    }

    /// The observed share of `n` decisions is within 5 standard deviations of `p`.
    fn assert_rate(sampler: &Sampler, service: &str, op: &str, p: f64) {
        let n = 40_000;
        let kept = ids(n, 7)
            .iter()
            .filter(|t| sampler.decide(service, op, t, 0.0))
            .count();
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        let share = kept as f64 / n as f64;
        assert!(
            (share - p).abs() <= 5.0 * sd + 1e-9,
            "{service} {op}: kept {share:.4}, expected {p} ± {:.4}",
            5.0 * sd
        );
    }

    #[test]
    fn rates_per_endpoint_hold_within_statistical_bounds() {
        let sampler = Sampler::new(Strategies::parse(RULES).unwrap());
        assert_rate(&sampler, "push-server", "POST /v1/push", 0.5);
        assert_rate(&sampler, "push-server", "GET /v1/history", 0.2);
        assert_rate(&sampler, "loadtest", "anything", 0.01);
        assert_rate(&sampler, "loadtest", "/healthz", 0.0);
        assert_rate(&sampler, "push-server", "/healthz", 0.0);
    }

    #[test]
    fn the_decision_depends_on_the_trace_id_only() {
        let a = Sampler::new(Strategies::parse(RULES).unwrap());
        let b = Sampler::new(Strategies::parse(RULES).unwrap());
        for id in ids(1000, 3) {
            assert_eq!(
                a.decide("push-server", "POST /v1/push", &id, 0.0),
                b.decide("push-server", "POST /v1/push", &id, 5.0)
            );
        }
    }

    #[test]
    fn rate_limiting_keeps_at_most_the_rate() {
        let sampler = Sampler::new(Strategies::parse(RULES).unwrap());
        let id = [1u8; 16];
        // 1,000 roots per second for 10 seconds. The bucket starts with one second's worth
        // (the burst), then refills at the rate: rate × 10 s ≤ kept ≤ burst + rate × 10 s.
        let kept_of = |service: &str, operation: &str| {
            (0..10_000)
                .filter(|i| sampler.decide(service, operation, &id, f64::from(*i) / 1000.0))
                .count()
        };
        // The service rule of msg-processor: 5 per second.
        let kept = kept_of("msg-processor", "consume");
        assert!((50..=55).contains(&kept), "kept {kept}");
        // The operation rule of push-server: 10 per second.
        let kept = kept_of("push-server", "deliver");
        assert!((100..=110).contains(&kept), "kept {kept}");
    }

    #[test]
    fn a_rule_change_takes_effect_without_restart() {
        let sampler = Sampler::new(Strategies::parse(RULES).unwrap());
        assert_rate(&sampler, "push-server", "POST /v1/push", 0.5);
        sampler.set_rules(
            Strategies::parse(&RULES.replace(r#""param": 0.5}"#, r#""param": 0.9}"#)).unwrap(),
        );
        assert_rate(&sampler, "push-server", "POST /v1/push", 0.9);
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        let err = Strategies::parse(&RULES.replace(r#""param": 0.5}"#, r#""param": 1.5}"#))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("push-server/POST /v1/push") && err.contains("1.5"),
            "{err}"
        );
        let err = Strategies::parse(r#"{"default_strategy": {"type": "sometimes", "param": 1}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant"), "{err}");
        let dup = r#"{"service_strategies": [
            {"service": "a", "type": "probabilistic", "param": 1},
            {"service": "a", "type": "probabilistic", "param": 1}]}"#;
        assert!(matches!(Strategies::parse(dup), Err(RulesError::DuplicateService(s)) if s == "a"));
        assert_eq!(Strategies::parse("{}").unwrap(), Strategies::default());
    }

    #[test]
    fn the_shipped_rules_file_is_valid() {
        let rules = Strategies::parse(include_str!("../sampling.json")).unwrap();
        assert_eq!(
            rules.rule("push-server", "POST /v1/push"),
            (StrategyType::Probabilistic, 0.05)
        );
        assert_eq!(
            rules.rule("anything", "GET /healthz"),
            (StrategyType::Probabilistic, 0.0)
        );
    }

    #[test]
    fn remote_response_has_jaegers_shape() {
        let rules = Strategies::parse(RULES).unwrap();
        let r = rules.remote_response("push-server");
        assert_eq!(r["strategyType"], "PROBABILISTIC");
        assert_eq!(r["probabilisticSampling"]["samplingRate"], 0.2);
        let ops = r["operationSampling"]["perOperationStrategies"]
            .as_array()
            .unwrap();
        let names: Vec<_> = ops
            .iter()
            .map(|o| o["operation"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["POST /v1/push", "/healthz"],
            "rate-limited operations left out"
        );
        let r = rules.remote_response("msg-processor");
        assert_eq!(r["strategyType"], "RATE_LIMITING");
        assert_eq!(r["rateLimitingSampling"]["maxTracesPerSecond"], 5);
        let r = rules.remote_response("unknown");
        assert_eq!(r["probabilisticSampling"]["samplingRate"], 0.01);
    }

    #[test]
    fn only_services_with_a_rule_are_named() {
        let rules = Strategies::parse(RULES).unwrap();
        assert!(rules.names("push-server"));
        assert!(rules.names("msg-processor"));
        assert!(!rules.names("unknown"), "the default applies to it");
    }
}
