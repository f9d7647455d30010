//! `inspect`: what a backlog looks like, how fast it drains, and what is about to go wrong.

use crate::broker::rabbitmq::settings::QueueSettings;
use crate::broker::{kafka, rabbitmq};
use crate::endpoint::Target;
use crate::error::Result;
use crate::ops::estimate::{DrainEstimate, DrainState};
use crate::progress::Progress;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A queue at or above this share of its length limit is "near" it.
const NEAR_LIMIT_SHARE: f64 = 0.9;
/// A head message older than this share of the TTL is about to expire.
const NEAR_EXPIRY_SHARE: f64 = 0.9;
/// Unconsumed Kafka messages within this share of the retained range are next to be deleted.
const NEAR_RETENTION_SHARE: f64 = 0.05;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InspectSpec {
    /// Queue (RabbitMQ) or topic (Kafka).
    pub name: String,
    /// Kafka consumer group whose lag to report.
    #[serde(default)]
    pub group: Option<String>,
    /// How long to sample rates for the drain estimate.
    #[serde(default = "default_sample", with = "crate::ops::duration_text")]
    pub sample: Duration,
}

fn default_sample() -> Duration {
    Duration::from_secs(5)
}

// One report per run: its size does not matter, so no boxing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "broker")]
pub enum InspectReport {
    #[serde(rename = "rabbitmq")]
    Rabbit(QueueReport),
    #[serde(rename = "kafka")]
    Kafka(TopicReport),
}

impl InspectReport {
    pub fn warnings(&self) -> &[Warning] {
        match self {
            InspectReport::Rabbit(report) => &report.warnings,
            InspectReport::Kafka(report) => &report.warnings,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Warning {
    /// Stable identifier scripts can match on.
    pub code: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueReport {
    pub name: String,
    pub vhost: String,
    /// Ready plus unacknowledged; `null` when unknown.
    pub depth: Option<u64>,
    pub ready: Option<u64>,
    pub unacked: Option<u64>,
    /// Body bytes of ready plus unacknowledged messages.
    pub message_bytes: Option<u64>,
    pub consumers: Option<u64>,
    /// `null` when the management API could not be asked.
    pub consumer_list: Option<Vec<ConsumerInfo>>,
    pub queue_type: Option<String>,
    pub durable: Option<bool>,
    pub policy: Option<String>,
    pub operator_policy: Option<String>,
    pub settings: Option<QueueSettings>,
    pub rates: QueueRates,
    /// Age in seconds of the oldest message, when it carries a timestamp property.
    pub head_message_age_secs: Option<f64>,
    pub drain: DrainEstimate,
    pub management_api: bool,
    pub notes: Vec<String>,
    pub warnings: Vec<Warning>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueRates {
    pub publish: Option<f64>,
    pub deliver: Option<f64>,
    pub ack: Option<f64>,
    pub redeliver: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConsumerInfo {
    pub consumer_tag: Option<String>,
    /// The name the client gave its connection, or the broker's name for it.
    pub connection: Option<String>,
    pub peer_host: Option<String>,
    pub user: Option<String>,
    pub prefetch: Option<u64>,
    pub ack_required: Option<bool>,
    /// True for connections opened by mqdrain itself.
    pub mqdrain: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopicReport {
    pub name: String,
    pub group: Option<String>,
    /// Total lag of the group; `null` without a group or when a partition's lag is unknown.
    pub lag: Option<u64>,
    pub partitions: Vec<PartitionReport>,
    pub group_state: Option<String>,
    pub members: Option<Vec<GroupMember>>,
    pub settings: TopicSettings,
    pub drain: Option<DrainEstimate>,
    pub notes: Vec<String>,
    pub warnings: Vec<Warning>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionReport {
    pub partition: i32,
    pub low: i64,
    pub high: i64,
    pub committed: Option<i64>,
    pub lag: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupMember {
    pub member_id: String,
    /// `null` when the broker leaves it empty (some Kafka-protocol brokers do).
    pub client_id: Option<String>,
    pub host: Option<String>,
}

/// Topic configs that decide what happens to unconsumed messages; `null` when the broker does
/// not report them (it then uses its own default).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TopicSettings {
    pub retention_ms: Option<i64>,
    pub retention_bytes: Option<i64>,
    pub cleanup_policy: Option<String>,
}

pub async fn execute(
    target: &Target,
    spec: &InspectSpec,
    progress: &Progress,
) -> Result<InspectReport> {
    match target {
        Target::Rabbit(rabbit) => {
            let mut report = rabbitmq::inspect::observe_queue(rabbit, spec, progress).await?;
            report.warnings = queue_warnings(&report);
            Ok(InspectReport::Rabbit(report))
        }
        Target::Kafka(kafka_target) => {
            let mut report = kafka::inspect::observe_topic(kafka_target, spec, progress).await?;
            report.warnings = topic_warnings(&report);
            Ok(InspectReport::Kafka(report))
        }
    }
}

/// The risks a RabbitMQ backlog runs, each in a plain sentence.
pub fn queue_warnings(report: &QueueReport) -> Vec<Warning> {
    let mut warnings = Vec::new();
    let depth = report.depth.or(report.ready);
    let has_backlog = depth.is_some_and(|depth| depth > 0);
    if let Some(settings) = &report.settings {
        let fate = match &settings.dead_letter_exchange {
            Some(dlx) => format!(
                "dead-lettered to exchange '{}'{}",
                dlx.value,
                settings
                    .dead_letter_routing_key
                    .as_ref()
                    .map(|key| format!(" with routing key '{}'", key.value))
                    .unwrap_or_default()
            ),
            None => "dropped for good (no dead-letter exchange is set)".to_string(),
        };
        if let (Some(ttl), true) = (&settings.message_ttl_ms, has_backlog) {
            let ttl_secs = ttl.value as f64 / 1000.0;
            if let Some(reason) = expiry_risk(report, ttl_secs) {
                let head = report
                    .head_message_age_secs
                    .map(|age| format!(" The oldest message is {} old.", human_secs(age)))
                    .unwrap_or_default();
                warnings.push(Warning {
                    code: "ttl-expiry",
                    message: format!(
                        "Messages expire after {} (x-message-ttl from {}) and {reason}: backlog messages that wait longer are {fate}.{head}",
                        human_secs(ttl_secs),
                        ttl.source
                    ),
                });
            }
        }
        if let Some((share, limit_text)) = limit_share(report, settings) {
            if share >= NEAR_LIMIT_SHARE {
                let at_or_near = if share >= 1.0 { "at" } else { "near" };
                let overflow = settings.overflow_behaviour();
                let (code, consequence) = if overflow.starts_with("reject-publish") {
                    (
                        "length-limit-reject-publish",
                        format!(
                            "with overflow '{overflow}' publishers are being refused (their messages are nacked{}), so producers may be failing or retrying",
                            if overflow == "reject-publish-dlx" { " and dead-lettered" } else { "" }
                        ),
                    )
                } else {
                    (
                        "length-limit-drop-head",
                        format!("with overflow 'drop-head' every new message pushes the oldest one out: the oldest messages are being {fate} right now"),
                    )
                };
                warnings.push(Warning {
                    code,
                    message: format!(
                        "The queue is {at_or_near} its length limit ({limit_text}); {consequence}."
                    ),
                });
            }
        }
    }
    if report.consumers == Some(0) && has_backlog {
        let growing = report.drain.net_drain_rate.is_some_and(|rate| rate < 0.0);
        if growing {
            warnings.push(Warning {
                code: "no-consumers-growing",
                message: format!(
                    "No consumers and the backlog is growing ({:.1} msg/s): nothing is draining this queue.",
                    -report.drain.net_drain_rate.unwrap_or_default()
                ),
            });
        }
    }
    warnings
}

/// Why backlog messages will wait out their TTL before a consumer takes them, if they will: a
/// queue that drains well within the TTL loses nothing to it.
fn expiry_risk(report: &QueueReport, ttl_secs: f64) -> Option<String> {
    if report.consumers == Some(0) {
        return Some("nothing consumes this queue".to_string());
    }
    match report.drain.state {
        DrainState::Growing => return Some("the backlog is growing".to_string()),
        DrainState::Stalled => return Some("the backlog is not shrinking".to_string()),
        _ => {}
    }
    // The newest message of the backlog waits about the ETA; the head has waited its age already
    // and goes first. Whichever is longer decides.
    if let Some(eta) = report.drain.eta_secs {
        if eta >= ttl_secs {
            return Some(format!(
                "the backlog needs about {} to drain at the current rate",
                human_secs(eta)
            ));
        }
    }
    match report.head_message_age_secs {
        Some(age) if age >= ttl_secs * NEAR_EXPIRY_SHARE => {
            Some("the oldest message is about to expire".to_string())
        }
        _ => None,
    }
}

fn limit_share(report: &QueueReport, settings: &QueueSettings) -> Option<(f64, String)> {
    let by_count = match (&settings.max_length, report.depth.or(report.ready)) {
        (Some(limit), Some(depth)) if limit.value > 0 => Some((
            depth as f64 / limit.value as f64,
            format!("{depth} of {} messages", limit.value),
        )),
        (Some(limit), Some(depth)) => Some((1.0, format!("{depth} of {} messages", limit.value))),
        _ => None,
    };
    let by_bytes = match (&settings.max_length_bytes, report.message_bytes) {
        (Some(limit), Some(bytes)) if limit.value > 0 => Some((
            bytes as f64 / limit.value as f64,
            format!("{bytes} of {} bytes", limit.value),
        )),
        _ => None,
    };
    match (by_count, by_bytes) {
        (Some(count), Some(bytes)) => Some(if bytes.0 > count.0 { bytes } else { count }),
        (count, bytes) => count.or(bytes),
    }
}

/// The risks a Kafka backlog runs.
pub fn topic_warnings(report: &TopicReport) -> Vec<Warning> {
    let mut warnings = Vec::new();
    let retention = match report.settings.retention_ms {
        Some(ms) if ms >= 0 => format!("retention.ms={ms}"),
        Some(_) => "unlimited time retention".to_string(),
        None => "the broker's default retention".to_string(),
    };
    for partition in &report.partitions {
        let Some(committed) = partition.committed else {
            continue;
        };
        if committed < partition.low {
            warnings.push(Warning {
                code: "retention-data-loss",
                message: format!(
                    "Partition {}: the group's committed offset {committed} is below the low watermark {} — retention ({retention}) already deleted {} unconsumed messages. That data is lost; the group will resume at auto.offset.reset.",
                    partition.partition,
                    partition.low,
                    partition.low - committed
                ),
            });
        } else if partition.low > 0 && committed < partition.high {
            let retained = (partition.high - partition.low).max(1) as f64;
            let headroom = (committed - partition.low) as f64;
            if headroom / retained <= NEAR_RETENTION_SHARE {
                warnings.push(Warning {
                    code: "retention-near",
                    message: format!(
                        "Partition {}: the oldest unconsumed offset {committed} is only {} messages above the low watermark {}; retention ({retention}) is deleting this partition's head, so unconsumed messages are next.",
                        partition.partition,
                        committed - partition.low,
                        partition.low
                    ),
                });
            }
        }
    }
    let no_members = report
        .members
        .as_ref()
        .is_some_and(|members| members.is_empty());
    let growing = report
        .drain
        .as_ref()
        .and_then(|drain| drain.net_drain_rate)
        .is_some_and(|rate| rate < 0.0);
    if no_members && report.lag.is_some_and(|lag| lag > 0) && growing {
        warnings.push(Warning {
            code: "no-consumers-growing",
            message: format!(
                "Group '{}' has no members and its lag is growing: nothing is consuming this topic.",
                report.group.as_deref().unwrap_or_default()
            ),
        });
    }
    warnings
}

pub fn human_secs(secs: f64) -> String {
    if !secs.is_finite() {
        return "never".to_string();
    }
    let whole = secs.round() as u64;
    match whole {
        0..=59 => format!("{secs:.0}s"),
        60..=3599 => format!("{}m{:02}s", whole / 60, whole % 60),
        3600..=86399 => format!("{}h{:02}m", whole / 3600, (whole % 3600) / 60),
        _ => format!("{}d{:02}h", whole / 86400, (whole % 86400) / 3600),
    }
}

/// A report as the management API gives it for an idle queue, for unit tests to adjust.
#[cfg(test)]
pub fn sample_queue_report() -> QueueReport {
    QueueReport {
        name: "orders".into(),
        vhost: "/".into(),
        depth: Some(1000),
        ready: Some(1000),
        unacked: Some(0),
        message_bytes: Some(1000 * 256),
        consumers: Some(1),
        consumer_list: Some(Vec::new()),
        queue_type: Some("classic".into()),
        durable: Some(true),
        policy: None,
        operator_policy: None,
        settings: Some(QueueSettings::default()),
        rates: QueueRates::default(),
        head_message_age_secs: None,
        drain: crate::ops::estimate::estimate(&[], None, None),
        management_api: true,
        notes: Vec::new(),
        warnings: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::rabbitmq::settings::Effective;
    use crate::ops::estimate::{estimate, Sample};

    fn with_ttl(ttl_ms: u64) -> QueueReport {
        let mut report = sample_queue_report();
        report.settings = Some(QueueSettings {
            message_ttl_ms: Some(Effective {
                value: ttl_ms,
                source: "argument",
            }),
            ..QueueSettings::default()
        });
        report
    }

    fn draining(depth: u64, rate: u64) -> DrainEstimate {
        let samples: Vec<Sample> = (0..3)
            .map(|second| Sample {
                at_secs: second as f64,
                depth: depth + (2 - second) * rate,
            })
            .collect();
        estimate(&samples, None, None)
    }

    fn ttl_warned(report: &QueueReport) -> bool {
        queue_warnings(report)
            .iter()
            .any(|warning| warning.code == "ttl-expiry")
    }

    #[test]
    fn a_ttl_on_a_queue_that_drains_in_time_is_no_risk() {
        let mut report = with_ttl(86_400_000);
        report.drain = draining(1000, 100);
        assert!(!ttl_warned(&report));
        // Draining, but slower than the TTL allows.
        let mut slow = with_ttl(5_000);
        slow.drain = draining(1000, 100);
        assert!(ttl_warned(&slow));
        // Draining in time, but the head is about to expire.
        report.head_message_age_secs = Some(86_000.0);
        assert!(ttl_warned(&report));
    }

    #[test]
    fn a_ttl_on_a_backlog_nobody_drains_is_a_risk() {
        let mut unconsumed = with_ttl(86_400_000);
        unconsumed.consumers = Some(0);
        assert!(ttl_warned(&unconsumed));
        let mut stalled = with_ttl(86_400_000);
        stalled.drain = estimate(
            &[
                Sample {
                    at_secs: 0.0,
                    depth: 1000,
                },
                Sample {
                    at_secs: 2.0,
                    depth: 1000,
                },
            ],
            None,
            None,
        );
        assert!(ttl_warned(&stalled));
        let mut empty = with_ttl(1_000);
        empty.consumers = Some(0);
        empty.depth = Some(0);
        assert!(!ttl_warned(&empty));
    }
}
