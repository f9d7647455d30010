//! `plan`: how much temporary capacity drains a backlog within a target time while inflow goes
//! on. The arithmetic is pure (`compute`); `execute` feeds it the rates `inspect` measures.
//!
//! The model: during the drain the forwarder moves the source's backlog and its inflow into the
//! temporary queues (partitions), each consumed by one consumer at the per-consumer rate. With
//! factor N the backlog (source plus temporary) shrinks at `min(N × lanes × per-consumer,
//! ceiling) − inflow`, where lanes is 1 for RabbitMQ (N queues) and the source's partition count
//! for Kafka (N partitions per source partition), and ceiling is the most the forwarder can
//! publish. Past the factor that reaches the ceiling, more temporary queues do not help.

use crate::broker::kafka::forwarding::FORWARDER_CLIENT_ID;
use crate::endpoint::Target;
use crate::error::{Error, Result};
use crate::ops::drain::MAX_FACTOR;
use crate::ops::inspect::{self, human_secs, InspectReport, InspectSpec};
use crate::progress::Progress;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What one forwarder moves when nothing else limits it, as measured on 2 busy cores (see
/// shared figures in the README): a lapin forwarder acking in batches ~12k msg/s, rounded down.
pub const DEFAULT_RABBIT_CEILING: f64 = 10_000.0;
/// Kafka forwarding is bounded by the consumer side (0.1-0.6M msg/s measured on Nisshi); a
/// conservative figure for real clusters with replication.
pub const DEFAULT_KAFKA_CEILING: f64 = 50_000.0;
/// A forwarder running at this share of its ceiling or more is close to becoming the bottleneck.
const NEAR_CEILING: f64 = 0.8;

fn default_sample() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    pub name: String,
    /// Kafka: the consumer group whose lag and throughput are measured.
    #[serde(default)]
    pub group: Option<String>,
    /// The drain must finish within this.
    #[serde(with = "crate::ops::duration_text")]
    pub target: Duration,
    /// Messages per second one consumer handles; default: measured (outflow / consumers).
    #[serde(default)]
    pub per_consumer_rate: Option<f64>,
    #[serde(default = "default_sample", with = "crate::ops::duration_text")]
    pub sample: Duration,
    /// The most the forwarder publishes per second; default per broker (see the constants).
    #[serde(default)]
    pub forwarder_rate: Option<f64>,
}

/// The inputs of the arithmetic, each in messages or messages per second.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rates {
    pub backlog: u64,
    pub inflow: f64,
    pub per_consumer: f64,
    /// Consumers per unit of factor: 1 (RabbitMQ), the source's partitions (Kafka).
    pub lanes: u64,
    pub ceiling: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Limit {
    Consumers,
    Forwarder,
}

/// The drain with one factor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub factor: usize,
    pub consumers: u64,
    /// Messages leaving the system per second.
    pub outflow: f64,
    /// Backlog shrink rate (outflow minus inflow); not positive: never drains.
    pub net: f64,
    pub eta_secs: Option<f64>,
    pub limited_by: Limit,
    pub meets_target: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// `factor` drains within the target.
    Meets,
    /// The forwarder's ceiling, not the consumers, keeps the target out of reach; `factor` is
    /// the smallest that reaches the ceiling.
    ForwarderBound,
    /// The target needs more than the largest factor allowed.
    BeyondMaxFactor,
    /// The forwarder cannot even keep up with the inflow: no factor drains the backlog.
    NeverDrains,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub verdict: Verdict,
    /// The factor to use: the smallest meeting the target, or the best there is.
    pub factor: Option<usize>,
    /// Outflow the target needs: inflow plus backlog / target.
    pub required_rate: f64,
    /// The smallest factor at which the forwarder's ceiling, not the consumers, limits.
    pub saturating_factor: usize,
    pub candidates: Vec<Candidate>,
    pub warnings: Vec<String>,
}

/// The drain with `factor`.
pub fn candidate(rates: &Rates, factor: usize, target_secs: f64) -> Candidate {
    let consumers = (factor as u64).saturating_mul(rates.lanes);
    let capacity = consumers as f64 * rates.per_consumer;
    let (outflow, limited_by) = if capacity >= rates.ceiling {
        (rates.ceiling, Limit::Forwarder)
    } else {
        (capacity, Limit::Consumers)
    };
    let net = outflow - rates.inflow;
    let eta_secs = match (rates.backlog, net) {
        (0, net) if net >= 0.0 => Some(0.0),
        (backlog, net) if net > 0.0 => Some(backlog as f64 / net),
        _ => None,
    };
    Candidate {
        factor,
        consumers,
        outflow,
        net,
        eta_secs,
        limited_by,
        meets_target: eta_secs.is_some_and(|eta| eta <= target_secs),
    }
}

/// The factor that drains `rates.backlog` within `target_secs`, with the ETA of a few factors
/// around it. Errors name the input that makes planning impossible.
pub fn compute(rates: &Rates, target_secs: f64) -> std::result::Result<Plan, String> {
    let positive = |value: f64| value.is_finite() && value > 0.0;
    if !positive(rates.per_consumer) {
        return Err(format!(
            "the per-consumer throughput is {}: with no consumer making progress there is nothing to multiply",
            rates.per_consumer
        ));
    }
    if !(rates.inflow.is_finite() && rates.inflow >= 0.0) {
        return Err(format!("the inflow rate {} is not a rate", rates.inflow));
    }
    if !positive(rates.ceiling) {
        return Err(format!(
            "the forwarder ceiling {} must be positive",
            rates.ceiling
        ));
    }
    if !positive(target_secs) {
        return Err("the target must be longer than zero".to_string());
    }
    let lanes = rates.lanes.max(1);
    let per_factor = lanes as f64 * rates.per_consumer;
    let required_rate = rates.inflow + rates.backlog as f64 / target_secs;
    let factor_for = |rate: f64| (rate / per_factor).ceil().max(1.0);
    let saturating = factor_for(rates.ceiling).min(MAX_FACTOR as f64) as usize;
    let mut warnings = Vec::new();
    let (verdict, factor) = if rates.ceiling <= rates.inflow {
        warnings.push(format!(
            "messages arrive at {:.0} msg/s, at or above what the forwarder moves ({:.0} msg/s): no number of temporary queues drains this backlog. Reduce the inflow or run more forwarders (each adds its own ceiling)",
            rates.inflow, rates.ceiling
        ));
        (Verdict::NeverDrains, None)
    } else if required_rate > rates.ceiling {
        warnings.push(format!(
            "the forwarder, not the consumers, is the bottleneck: draining within the target needs {required_rate:.0} msg/s but the forwarder moves at most {:.0} msg/s; beyond factor {saturating} more temporary queues do not help. Run several forwarders, or accept the ETA of factor {saturating}",
            rates.ceiling
        ));
        (Verdict::ForwarderBound, Some(saturating))
    } else if factor_for(required_rate) > MAX_FACTOR as f64 {
        warnings.push(format!(
            "the target needs {required_rate:.0} msg/s, more than {MAX_FACTOR} × {per_factor:.1} msg/s of consumers: raise the per-consumer throughput or the target"
        ));
        (Verdict::BeyondMaxFactor, None)
    } else {
        let factor = factor_for(required_rate) as usize;
        let chosen = candidate(rates, factor, target_secs);
        if chosen.outflow >= NEAR_CEILING * rates.ceiling {
            warnings.push(format!(
                "at factor {factor} the forwarder runs at {:.0}% of its {:.0} msg/s ceiling: if its real ceiling is lower, the target is missed and more temporary queues will not help",
                100.0 * chosen.outflow / rates.ceiling,
                rates.ceiling
            ));
        }
        (Verdict::Meets, Some(factor))
    };
    let around = factor.unwrap_or(saturating);
    let mut factors: Vec<usize> = [
        around / 2,
        around.saturating_sub(1),
        around,
        around + 1,
        around * 2,
        saturating,
    ]
    .into_iter()
    .filter(|factor| (1..=MAX_FACTOR).contains(factor))
    .collect();
    factors.sort_unstable();
    factors.dedup();
    Ok(Plan {
        verdict,
        factor,
        required_rate,
        saturating_factor: saturating,
        candidates: factors
            .into_iter()
            .map(|factor| candidate(rates, factor, target_secs))
            .collect(),
        warnings,
    })
}

/// What was measured (or given) for the plan, and where each figure came from.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    pub name: String,
    pub broker: &'static str,
    pub target_secs: f64,
    pub rates: Rates,
    /// Consumers attached now (mqdrain's own excluded).
    pub consumers_now: Option<u64>,
    /// Outflow now, and when the backlog empties at this pace.
    pub outflow_now: Option<f64>,
    pub eta_now_secs: Option<f64>,
    /// "measured" or "given".
    pub per_consumer_source: &'static str,
    /// "default" or "given".
    pub ceiling_source: &'static str,
    pub plan: Plan,
    pub notes: Vec<String>,
}

/// Measures the backlog with `inspect` and computes the plan.
pub async fn execute(target: &Target, spec: &PlanSpec, progress: &Progress) -> Result<PlanReport> {
    if spec.target.is_zero() {
        return Err(Error::usage("--target must be longer than zero, e.g. 30m"));
    }
    let inspect_spec = InspectSpec {
        name: spec.name.clone(),
        group: spec.group.clone(),
        sample: spec.sample,
    };
    if matches!(target, Target::Kafka(_)) && spec.group.is_none() {
        return Err(Error::usage(format!(
            "plan on Kafka needs --group: the consumer group whose lag topic '{}' is drained for",
            spec.name
        )));
    }
    let report = inspect::execute(target, &inspect_spec, progress).await?;
    let measured = Measured::from(&report);
    let mut notes = measured.notes;
    let backlog = measured.backlog.ok_or_else(|| {
        Error::Broker(format!(
            "the backlog of '{}' is unknown (the broker did not report it): run `mqdrain inspect {}` to see what is missing",
            spec.name, spec.name
        ))
    })?;
    let inflow = measured.inflow.unwrap_or_else(|| {
        notes.push(
            "inflow unknown (no publishes reported while sampling): planned as 0 msg/s".to_string(),
        );
        0.0
    });
    let (per_consumer, per_consumer_source) = match spec.per_consumer_rate {
        Some(rate) => (rate, "given"),
        None => match (measured.outflow, measured.consumers) {
            (Some(outflow), Some(consumers)) if consumers > 0 && outflow > 0.0 => {
                (outflow / consumers as f64, "measured")
            }
            _ => {
                return Err(Error::usage(format!(
                    "cannot measure the per-consumer throughput of '{}': {} consumer(s), outflow {}. Pass --per-consumer-rate <msg/s> (what one of your consumers handles)",
                    spec.name,
                    measured.consumers.map_or("?".to_string(), |c| c.to_string()),
                    measured.outflow.map_or("unknown".to_string(), |o| format!("{o:.1} msg/s"))
                )))
            }
        },
    };
    let (ceiling, ceiling_source) = match spec.forwarder_rate {
        Some(rate) => (rate, "given"),
        None => (
            match target {
                Target::Rabbit(_) => DEFAULT_RABBIT_CEILING,
                Target::Kafka(_) => DEFAULT_KAFKA_CEILING,
            },
            "default",
        ),
    };
    let rates = Rates {
        backlog,
        inflow,
        per_consumer,
        lanes: measured.lanes,
        ceiling,
    };
    let target_secs = spec.target.as_secs_f64();
    let plan = compute(&rates, target_secs).map_err(|reason| {
        Error::usage(format!(
            "cannot plan the drain of '{}': {reason}. Pass --per-consumer-rate / --forwarder-rate to set the figures yourself",
            spec.name
        ))
    })?;
    let outflow_now = measured.outflow;
    let eta_now_secs = outflow_now.and_then(|outflow| {
        let net = outflow - inflow;
        (net > 0.0).then(|| backlog as f64 / net)
    });
    Ok(PlanReport {
        name: spec.name.clone(),
        broker: match target {
            Target::Rabbit(_) => "rabbitmq",
            Target::Kafka(_) => "kafka",
        },
        target_secs,
        rates,
        consumers_now: measured.consumers,
        outflow_now,
        eta_now_secs,
        per_consumer_source,
        ceiling_source,
        plan,
        notes,
    })
}

/// The figures the plan needs, read out of an inspect report.
struct Measured {
    backlog: Option<u64>,
    inflow: Option<f64>,
    outflow: Option<f64>,
    consumers: Option<u64>,
    lanes: u64,
    notes: Vec<String>,
}

impl From<&InspectReport> for Measured {
    fn from(report: &InspectReport) -> Self {
        let mut notes = Vec::new();
        match report {
            InspectReport::Rabbit(queue) => {
                let own = queue
                    .consumer_list
                    .as_ref()
                    .map(|list| list.iter().filter(|c| c.mqdrain).count() as u64);
                if own.is_some_and(|own| own > 0) {
                    notes.push("an mqdrain forwarder consumes this queue: its acks count in the outflow, so the per-consumer figure is not the application's".to_string());
                }
                Measured {
                    backlog: queue.depth.or(queue.ready),
                    inflow: queue.drain.inflow_rate,
                    outflow: queue.drain.outflow_rate,
                    consumers: queue
                        .consumers
                        .map(|all| all.saturating_sub(own.unwrap_or(0))),
                    lanes: 1,
                    notes,
                }
            }
            InspectReport::Kafka(topic) => {
                let drain = topic.drain.as_ref();
                Measured {
                    backlog: topic.lag,
                    inflow: drain.and_then(|drain| drain.inflow_rate),
                    outflow: drain.and_then(|drain| drain.outflow_rate),
                    consumers: topic.members.as_ref().map(|members| {
                        members
                            .iter()
                            .filter(|member| {
                                member.client_id.as_deref() != Some(FORWARDER_CLIENT_ID)
                            })
                            .count() as u64
                    }),
                    lanes: topic.partitions.len().max(1) as u64,
                    notes,
                }
            }
        }
    }
}

/// One line for outcomes: the chosen factor and why.
pub fn summary(report: &PlanReport) -> String {
    let plan = &report.plan;
    let chosen = plan
        .factor
        .and_then(|factor| plan.candidates.iter().find(|c| c.factor == factor));
    match (plan.verdict, chosen) {
        (Verdict::NeverDrains, _) | (_, None) => format!(
            "no factor drains '{}' (inflow {:.0} msg/s, forwarder ceiling {:.0} msg/s)",
            report.name, report.rates.inflow, report.rates.ceiling
        ),
        (verdict, Some(chosen)) => format!(
            "factor {} planned for '{}': {} consumers at {:.1} msg/s each drain {} messages (inflow {:.0} msg/s) in {}{}",
            chosen.factor,
            report.name,
            chosen.consumers,
            report.rates.per_consumer,
            report.rates.backlog,
            report.rates.inflow,
            chosen.eta_secs.map_or_else(|| "never".to_string(), human_secs),
            if verdict == Verdict::Meets {
                format!(" (target {})", human_secs(report.target_secs))
            } else {
                format!(
                    ", NOT within the target {}: the forwarder is the bottleneck",
                    human_secs(report.target_secs)
                )
            }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(backlog: u64, inflow: f64, per_consumer: f64, lanes: u64, ceiling: f64) -> Rates {
        Rates {
            backlog,
            inflow,
            per_consumer,
            lanes,
            ceiling,
        }
    }

    #[test]
    fn smallest_factor_that_meets_the_target() {
        // 100k backlog in 10 min with 50 msg/s inflow: 50 + 166.7 = 216.7 msg/s; 20 msg/s each.
        let plan = compute(&rates(100_000, 50.0, 20.0, 1, 10_000.0), 600.0).expect("plan");
        assert_eq!(plan.verdict, Verdict::Meets);
        assert_eq!(plan.factor, Some(11));
        let chosen = candidate(&rates(100_000, 50.0, 20.0, 1, 10_000.0), 11, 600.0);
        assert!(chosen.meets_target);
        assert!(!candidate(&rates(100_000, 50.0, 20.0, 1, 10_000.0), 10, 600.0).meets_target);
        let factors: Vec<usize> = plan.candidates.iter().map(|c| c.factor).collect();
        assert_eq!(factors, vec![5, 10, 11, 12, 22, 500]);
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    }

    #[test]
    fn kafka_multiplies_each_source_partition() {
        // 4 partitions: factor N means 4N consumers.
        let plan = compute(&rates(72_000, 0.0, 10.0, 4, 50_000.0), 3600.0).expect("plan");
        assert_eq!(plan.factor, Some(1), "20 msg/s needed, 40 available at N=1");
        let plan = compute(&rates(720_000, 0.0, 10.0, 4, 50_000.0), 3600.0).expect("plan");
        assert_eq!(plan.factor, Some(5), "200 msg/s needed: 20 consumers");
        assert_eq!(plan.candidates[2].consumers, 20);
    }

    #[test]
    fn inflow_at_or_above_the_forwarder_never_drains() {
        let plan = compute(&rates(1000, 500.0, 50.0, 1, 500.0), 60.0).expect("plan");
        assert_eq!(plan.verdict, Verdict::NeverDrains);
        assert_eq!(plan.factor, None);
        assert!(plan.candidates.iter().all(|c| c.eta_secs.is_none()));
        assert!(plan.warnings[0].contains("no number of temporary queues"));
    }

    #[test]
    fn inflow_above_a_small_factors_outflow_never_drains_at_that_factor() {
        let few = candidate(&rates(1000, 100.0, 40.0, 1, 10_000.0), 2, 60.0);
        assert_eq!(few.net, -20.0);
        assert_eq!(few.eta_secs, None);
        assert!(!few.meets_target);
        let equal = candidate(&rates(1000, 80.0, 40.0, 1, 10_000.0), 2, 60.0);
        assert_eq!(equal.eta_secs, None, "inflow equal to outflow never drains");
    }

    #[test]
    fn the_forwarder_ceiling_caps_more_queues() {
        // Needs 1000 + 100k/60 = 2667 msg/s; the forwarder moves 2000.
        let plan = compute(&rates(100_000, 1000.0, 100.0, 1, 2000.0), 60.0).expect("plan");
        assert_eq!(plan.verdict, Verdict::ForwarderBound);
        assert_eq!(plan.factor, Some(20), "20 consumers reach the ceiling");
        let at_20 = candidate(&rates(100_000, 1000.0, 100.0, 1, 2000.0), 20, 60.0);
        let at_40 = candidate(&rates(100_000, 1000.0, 100.0, 1, 2000.0), 40, 60.0);
        assert_eq!(at_20.limited_by, Limit::Forwarder);
        assert_eq!(at_20.eta_secs, at_40.eta_secs, "more queues do not help");
        assert_eq!(at_20.eta_secs, Some(100.0));
        assert!(plan.warnings[0].contains("bottleneck"));
    }

    #[test]
    fn near_the_ceiling_is_a_warning() {
        let plan = compute(&rates(54_000, 0.0, 100.0, 1, 1000.0), 60.0).expect("plan");
        assert_eq!(plan.verdict, Verdict::Meets);
        assert_eq!(plan.factor, Some(9));
        assert!(plan.warnings[0].contains("90%"), "{:?}", plan.warnings);
    }

    #[test]
    fn zero_rates() {
        assert!(compute(&rates(1000, 0.0, 0.0, 1, 1000.0), 60.0)
            .unwrap_err()
            .contains("per-consumer throughput is 0"));
        assert!(compute(&rates(1000, 0.0, 10.0, 1, 0.0), 60.0).is_err());
        assert!(compute(&rates(1000, 0.0, 10.0, 1, 1000.0), 0.0).is_err());
        assert!(compute(&rates(1000, f64::NAN, 10.0, 1, 1000.0), 60.0).is_err());
        // Nothing arriving and nothing waiting: one queue, done now.
        let idle = compute(&rates(0, 0.0, 10.0, 1, 1000.0), 60.0).expect("plan");
        assert_eq!(idle.factor, Some(1));
        assert_eq!(idle.candidates[0].eta_secs, Some(0.0));
        // Zero inflow: the backlog alone decides.
        let plan = compute(&rates(6000, 0.0, 10.0, 1, 1000.0), 60.0).expect("plan");
        assert_eq!(plan.factor, Some(10));
    }

    #[test]
    fn beyond_the_largest_factor() {
        let plan = compute(&rates(10_000_000, 0.0, 0.01, 1, 1e9), 60.0).expect("plan");
        assert_eq!(plan.verdict, Verdict::BeyondMaxFactor);
        assert_eq!(plan.factor, None);
    }
}
