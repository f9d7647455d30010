//! `wait` gate conditions (`source.depth < 1000`, `temporary.consumers == 0`) and their
//! evaluation against a sample — pure functions, so the gate logic is tested without a broker.

use crate::ops::drain::WatchSample;
use serde::Serialize;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Subject {
    /// The queue or topic holding the backlog.
    Source,
    /// Every temporary queue (or the temporary topic) together.
    Temporary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// RabbitMQ: ready + unacked (management API); Kafka: lag. `lag` is the same number.
    Depth,
    /// Consumers attached (RabbitMQ) or group members (Kafka).
    Consumers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Comparison {
    #[serde(rename = "<")]
    Less,
    #[serde(rename = "<=")]
    LessEqual,
    #[serde(rename = "==")]
    Equal,
    #[serde(rename = "!=")]
    NotEqual,
    #[serde(rename = ">=")]
    GreaterEqual,
    #[serde(rename = ">")]
    Greater,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Condition {
    pub subject: Subject,
    pub metric: Metric,
    pub comparison: Comparison,
    pub value: u64,
    /// As written, for messages.
    pub text: String,
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

pub const CONDITION_HELP: &str = "expected `<source|temporary>.<depth|lag|consumers> <op> <number>` with op one of < <= == != >= >, e.g. `source.depth == 0` or `temporary.consumers == 0`";

impl Condition {
    pub fn parse(text: &str) -> Result<Condition, String> {
        let trimmed = text.trim();
        let operators = [
            ("<=", Comparison::LessEqual),
            (">=", Comparison::GreaterEqual),
            ("==", Comparison::Equal),
            ("!=", Comparison::NotEqual),
            ("<", Comparison::Less),
            (">", Comparison::Greater),
        ];
        let Some((at, symbol, comparison)) = operators
            .iter()
            .filter_map(|(symbol, comparison)| {
                trimmed.find(symbol).map(|at| (at, *symbol, *comparison))
            })
            .min_by_key(|(at, symbol, _)| (*at, usize::MAX - symbol.len()))
        else {
            return Err(format!("invalid condition '{trimmed}': {CONDITION_HELP}"));
        };
        let left = trimmed[..at].trim();
        let right = trimmed[at + symbol.len()..].trim();
        let (subject, metric) = left
            .split_once('.')
            .ok_or_else(|| format!("invalid condition '{trimmed}': {CONDITION_HELP}"))?;
        let subject = match subject {
            "source" => Subject::Source,
            "temporary" => Subject::Temporary,
            other => {
                return Err(format!(
                    "invalid condition '{trimmed}': unknown subject '{other}', expected `source` or `temporary`"
                ))
            }
        };
        let metric = match metric {
            "depth" | "lag" => Metric::Depth,
            "consumers" => Metric::Consumers,
            other => {
                return Err(format!(
                    "invalid condition '{trimmed}': unknown measure '{other}', expected `depth`, `lag` or `consumers`"
                ))
            }
        };
        let value = right.parse::<u64>().map_err(|_| {
            format!(
                "invalid condition '{trimmed}': '{right}' is not a whole number; {CONDITION_HELP}"
            )
        })?;
        Ok(Condition {
            subject,
            metric,
            comparison,
            value,
            text: trimmed.to_string(),
        })
    }

    /// `None` when the measure is unknown: unknown never satisfies a gate.
    pub fn holds(&self, snapshot: &Snapshot) -> Option<bool> {
        let side = match self.subject {
            Subject::Source => &snapshot.source,
            Subject::Temporary => &snapshot.temporary,
        };
        let actual = match self.metric {
            Metric::Depth => side.depth,
            Metric::Consumers => side.consumers,
        }?;
        Some(match self.comparison {
            Comparison::Less => actual < self.value,
            Comparison::LessEqual => actual <= self.value,
            Comparison::Equal => actual == self.value,
            Comparison::NotEqual => actual != self.value,
            Comparison::GreaterEqual => actual >= self.value,
            Comparison::Greater => actual > self.value,
        })
    }
}

/// What a gate looks at: source and temporary totals; `None` where unknown.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub source: Measures,
    pub temporary: Measures,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Measures {
    pub depth: Option<u64>,
    pub consumers: Option<u64>,
}

impl Snapshot {
    /// Depths from a watch sample; consumers are filled in separately when a condition needs them.
    pub fn from_sample(sample: &WatchSample) -> Snapshot {
        Snapshot {
            source: Measures {
                depth: sample.source.depth,
                consumers: None,
            },
            temporary: Measures {
                // No temporary queues at all is an empty temporary topology, not an unknown one.
                depth: sample.temporary.iter().map(|backlog| backlog.depth).sum(),
                consumers: if sample.temporary.is_empty() {
                    Some(0)
                } else {
                    None
                },
            },
        }
    }

    /// "source.depth=12 temporary.depth=unknown" for messages.
    pub fn describe(&self, conditions: &[Condition]) -> String {
        let mut parts = Vec::new();
        for condition in conditions {
            let (name, side) = match condition.subject {
                Subject::Source => ("source", &self.source),
                Subject::Temporary => ("temporary", &self.temporary),
            };
            let (metric, value) = match condition.metric {
                Metric::Depth => ("depth", side.depth),
                Metric::Consumers => ("consumers", side.consumers),
            };
            let part = format!(
                "{name}.{metric}={}",
                value.map_or_else(|| "unknown".to_string(), |v| v.to_string())
            );
            if !parts.contains(&part) {
                parts.push(part);
            }
        }
        parts.join(" ")
    }
}

/// True when every condition holds (an unknown measure counts as not holding).
pub fn all_hold(conditions: &[Condition], snapshot: &Snapshot) -> bool {
    conditions
        .iter()
        .all(|condition| condition.holds(snapshot) == Some(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::drain::Backlog;

    fn backlog(name: &str, depth: Option<u64>) -> Backlog {
        Backlog {
            name: name.into(),
            depth,
            in_rate: None,
            out_rate: None,
            eta_secs: None,
        }
    }

    #[test]
    fn parses_conditions() {
        let condition = Condition::parse(" source.depth<1000 ").unwrap();
        assert_eq!(condition.subject, Subject::Source);
        assert_eq!(condition.metric, Metric::Depth);
        assert_eq!(condition.comparison, Comparison::Less);
        assert_eq!(condition.value, 1000);
        let condition = Condition::parse("temporary.lag <= 5").unwrap();
        assert_eq!(condition.metric, Metric::Depth);
        assert_eq!(condition.comparison, Comparison::LessEqual);
        assert_eq!(
            Condition::parse("temporary.consumers == 0")
                .unwrap()
                .comparison,
            Comparison::Equal
        );
        for bad in [
            "source.depth",
            "queue.depth == 0",
            "source.size == 0",
            "source.depth == -1",
            "depth == 0",
        ] {
            assert!(Condition::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn evaluates_against_samples_and_unknown_never_holds() {
        let sample = WatchSample {
            at_secs: 1.0,
            source: backlog("q", Some(0)),
            temporary: vec![backlog("q.drain.0", Some(5)), backlog("q.drain.1", Some(7))],
            total: Some(12),
        };
        let snapshot = Snapshot::from_sample(&sample);
        let source_empty = Condition::parse("source.depth == 0").unwrap();
        let temp_small = Condition::parse("temporary.depth < 13").unwrap();
        let temp_empty = Condition::parse("temporary.depth == 0").unwrap();
        assert_eq!(source_empty.holds(&snapshot), Some(true));
        assert_eq!(temp_small.holds(&snapshot), Some(true));
        assert_eq!(temp_empty.holds(&snapshot), Some(false));
        assert!(all_hold(&[source_empty.clone(), temp_small], &snapshot));
        let unknown = WatchSample {
            temporary: vec![backlog("q.drain.0", None), backlog("q.drain.1", Some(0))],
            ..sample
        };
        let snapshot = Snapshot::from_sample(&unknown);
        assert_eq!(temp_empty.holds(&snapshot), None);
        assert!(!all_hold(std::slice::from_ref(&temp_empty), &snapshot));
        let consumers = Condition::parse("source.consumers == 0").unwrap();
        assert_eq!(consumers.holds(&snapshot), None);
        assert_eq!(
            snapshot.describe(&[temp_empty, source_empty]),
            "temporary.depth=unknown source.depth=0"
        );
    }
}
