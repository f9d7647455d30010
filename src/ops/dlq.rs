//! Dead-letter queues: `dlq inspect` tells what died, why, where it came from and how long ago,
//! without consuming anything for good; `dlq replay` sends dead letters back under a retry
//! budget of mqdrain's own and parks those that used it up.
//!
//! Reading without consuming. RabbitMQ has no "browse": mqdrain consumes with manual
//! acknowledgement and a prefetch of at most `--max-messages` (AMQP caps it at 65535), never
//! acknowledges, and closes its channel, which returns every message to the queue. The messages
//! are redelivered later with the `redelivered` flag set, and a classic queue puts them back in
//! their old places, so the order is kept. (`basic.get` would have the same effect one round trip
//! per message; a quorum queue counts each return as a delivery attempt, see the warning in
//! `dlq inspect`.) Kafka reads a dead-letter topic with an assigned consumer that never joins or
//! commits for a group, so no group's offsets move.
//!
//! The retry budget. RabbitMQ stopped incrementing `x-death` counts in 3.13, so a replayed
//! message carries `x-mqdrain-replays` (AMQP header or Kafka record header), incremented on
//! every replay. A message whose counter reached `--max-retries` goes to the parking lot for
//! manual handling instead of around the loop again.
//!
//! Replay reuses the forwarding loop: the broker's source on the DLQ and a sink whose targets
//! are `[--to, --parking-lot]`; the sink routes each message itself (`Sink::route`), and
//! messages it skips (filtered out, or at the budget without a parking lot) stay in the DLQ.

use crate::broker::{kafka, rabbitmq};
use crate::endpoint::Target;
use crate::error::{Error, Result};
use crate::ops::dedup::{Dedup, DedupSettings};
use crate::ops::forward_loop::LoopOutcome;
use crate::ops::inspect::Warning;
use crate::progress::Progress;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// mqdrain's own retry counter on a replayed message.
pub const REPLAYS_HEADER: &str = "x-mqdrain-replays";
/// On a parked message: the dead-letter queue or topic it was parked from.
pub const PARKED_FROM_HEADER: &str = "x-mqdrain-parked-from";
/// Kafka has no standard dead-letter reason; this header is read unless `--reason-header` says
/// otherwise.
pub const DEFAULT_REASON_HEADER: &str = "x-death-reason";
/// How `dead_letter` fields that are absent show in the counts.
pub const NONE: &str = "(none)";
/// AMQP's prefetch count is 16 bits: a peek cannot hold more messages unacknowledged.
pub const MAX_RABBIT_PEEK: u64 = u16::MAX as u64;
/// Confirmed replays acknowledged together on the DLQ.
pub const REPLAY_ACK_BATCH: usize = 100;

fn default_peek() -> u64 {
    10_000
}
fn default_reason_header() -> String {
    DEFAULT_REASON_HEADER.to_string()
}
fn default_max_retries() -> u64 {
    3
}
fn default_prefetch() -> u16 {
    5000
}
fn default_window() -> usize {
    500
}
fn default_idle() -> Duration {
    Duration::from_secs(3)
}
fn default_attempts() -> u32 {
    5
}

/// `filter: reason=expired` and `filter: [reason=expired, queue=orders]` both read.
fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(text) => vec![text],
        OneOrMany::Many(list) => list,
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqInspectSpec {
    /// The dead-letter queue (RabbitMQ) or topic (Kafka).
    pub name: String,
    /// Most messages to read.
    #[serde(default = "default_peek")]
    pub max_messages: u64,
    /// Kafka: the record header holding the dead-letter reason.
    #[serde(default = "default_reason_header")]
    pub reason_header: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqReplaySpec {
    /// The dead-letter queue (RabbitMQ) or topic (Kafka).
    pub name: String,
    /// Where replayed messages go: a queue (RabbitMQ, through the default exchange) or a topic.
    pub to: String,
    /// Replays a message may have had; one at the budget is parked instead.
    #[serde(default = "default_max_retries")]
    pub max_retries: u64,
    /// Queue or topic for messages at the budget; without it they stay in the DLQ.
    #[serde(default)]
    pub parking_lot: Option<String>,
    /// `field=value[,value...]`: only matching messages move (fields: reason, queue,
    /// routing-key; Kafka: reason). Several filters must all match.
    #[serde(default, deserialize_with = "one_or_many")]
    pub filter: Vec<String>,
    /// Most messages to look at (replayed, parked or skipped).
    #[serde(default)]
    pub max_messages: Option<u64>,
    #[serde(default)]
    pub rate_limit: Option<f64>,
    /// Kafka: the consumer group the replay commits under.
    #[serde(default)]
    pub group: Option<String>,
    /// Kafka: the record header holding the dead-letter reason.
    #[serde(default = "default_reason_header")]
    pub reason_header: String,
    /// RabbitMQ consumer prefetch; messages skipped by the filter occupy it until the end.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    #[serde(default = "default_window")]
    pub confirm_window: usize,
    /// Stop once the DLQ had nothing new for this long.
    #[serde(default = "default_idle", with = "crate::ops::duration_text")]
    pub idle_timeout: Duration,
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Redis URL for duplicate suppression (see `ops::dedup`); the key counts
    /// `x-mqdrain-replays`, so only a second copy of the same replay is suppressed.
    #[serde(default)]
    pub dedup: Option<String>,
    #[serde(
        default = "crate::ops::dedup::default_ttl",
        with = "crate::ops::duration_text"
    )]
    pub dedup_ttl: Duration,
    #[serde(
        default = "crate::ops::dedup::default_inflight_ttl",
        with = "crate::ops::duration_text"
    )]
    pub dedup_inflight_ttl: Duration,
    #[serde(default)]
    pub id_header: Option<String>,
    #[serde(default)]
    pub dedup_optional: bool,
}

impl DlqReplaySpec {
    pub fn dedup_settings(&self) -> DedupSettings {
        DedupSettings {
            url: self.dedup.clone(),
            ttl: self.dedup_ttl,
            inflight_ttl: self.dedup_inflight_ttl,
            id_header: self.id_header.clone(),
            optional: self.dedup_optional,
        }
    }

    /// Opens the duplicate-suppression store for this replay (`None` without `--dedup`):
    /// scoped to the DLQ, with the replay counter in each message's identity.
    pub async fn open_dedup(&self, scope: &[&str], progress: &Progress) -> Result<Option<Dedup>> {
        Ok(Dedup::open(&self.dedup_settings(), scope, progress)
            .await?
            .map(|dedup| dedup.by_generation(REPLAYS_HEADER)))
    }
}

/// What one dead letter says about itself, whatever the broker.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeadLetter {
    /// rejected, expired, maxlen, delivery_limit (RabbitMQ), or the reason header (Kafka).
    pub reason: Option<String>,
    /// RabbitMQ: the queue it first died in.
    pub queue: Option<String>,
    /// RabbitMQ: the routing key it was first published with.
    pub routing_key: Option<String>,
    /// Kafka: the dead-letter topic's partition it sits in.
    pub partition: Option<i32>,
    /// When it was dead-lettered (RabbitMQ: the latest `x-death` time; Kafka: the record
    /// timestamp), milliseconds since the epoch.
    pub dead_at_ms: Option<i64>,
    /// `x-mqdrain-replays`, 0 when absent.
    pub replays: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FilterField {
    Reason,
    Queue,
    RoutingKey,
}

impl FilterField {
    pub fn name(self) -> &'static str {
        match self {
            FilterField::Reason => "reason",
            FilterField::Queue => "queue",
            FilterField::RoutingKey => "routing-key",
        }
    }
}

/// One `--filter field=value[,value...]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Filter {
    pub field: FilterField,
    pub values: Vec<String>,
}

impl Filter {
    pub fn parse(text: &str) -> Result<Filter> {
        let usage = || {
            Error::usage(format!(
                "invalid --filter '{text}': write field=value[,value...], with field reason, queue or routing-key, e.g. --filter reason=expired"
            ))
        };
        let (field, values) = text.split_once('=').ok_or_else(usage)?;
        let field = match field.trim() {
            "reason" => FilterField::Reason,
            "queue" => FilterField::Queue,
            "routing-key" | "routing_key" => FilterField::RoutingKey,
            _ => return Err(usage()),
        };
        let values: Vec<String> = values
            .split(',')
            .map(|value| value.trim().to_string())
            .filter(|value| !value.is_empty())
            .collect();
        if values.is_empty() {
            return Err(usage());
        }
        Ok(Filter { field, values })
    }

    pub fn matches(&self, letter: &DeadLetter) -> bool {
        let value = match self.field {
            FilterField::Reason => &letter.reason,
            FilterField::Queue => &letter.queue,
            FilterField::RoutingKey => &letter.routing_key,
        };
        let value = value.as_deref().unwrap_or(NONE);
        self.values.iter().any(|wanted| wanted == value)
    }
}

/// Where the replay sends one dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// Back to `--to`, counter incremented.
    Replay,
    /// To the parking lot: the counter reached the budget.
    Park,
    /// At the budget, but no parking lot was given: it stays in the DLQ.
    KeepAtBudget,
    /// Does not match `--filter`: it stays in the DLQ.
    Filtered,
}

impl Destination {
    /// The sink's target index: 0 is `--to`, 1 the parking lot.
    pub const REPLAY_TARGET: usize = 0;
    pub const PARKING_TARGET: usize = 1;
}

/// The replay's decision for each message.
#[derive(Debug, Clone)]
pub struct ReplayRules {
    pub filters: Vec<Filter>,
    pub max_retries: u64,
    pub parking_lot: bool,
}

impl ReplayRules {
    pub fn from_spec(spec: &DlqReplaySpec) -> Result<Self> {
        Ok(ReplayRules {
            filters: spec
                .filter
                .iter()
                .map(|text| Filter::parse(text))
                .collect::<Result<_>>()?,
            max_retries: spec.max_retries,
            parking_lot: spec.parking_lot.is_some(),
        })
    }

    /// The filter first: a message it excludes is not this replay's business, whatever its
    /// counter says.
    pub fn destination(&self, letter: &DeadLetter) -> Destination {
        if !self.filters.iter().all(|filter| filter.matches(letter)) {
            Destination::Filtered
        } else if letter.replays < self.max_retries {
            Destination::Replay
        } else if self.parking_lot {
            Destination::Park
        } else {
            Destination::KeepAtBudget
        }
    }
}

/// Decisions the sinks made that the loop's outcome does not count: the skipped messages.
#[derive(Debug, Default)]
pub struct SkipCounts {
    pub filtered: AtomicU64,
    pub kept_at_budget: AtomicU64,
}

impl SkipCounts {
    pub fn record(&self, destination: Destination) {
        let counter = match destination {
            Destination::Filtered => &self.filtered,
            Destination::KeepAtBudget => &self.kept_at_budget,
            Destination::Replay | Destination::Park => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn filtered(&self) -> u64 {
        self.filtered.load(Ordering::Relaxed)
    }

    pub fn kept_at_budget(&self) -> u64 {
        self.kept_at_budget.load(Ordering::Relaxed)
    }
}

/// The counter's value from its text form (Kafka headers, or an AMQP string header).
pub fn parse_replays(text: &[u8]) -> u64 {
    std::str::from_utf8(text)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Serialize)]
pub struct AgeBucket {
    pub label: &'static str,
    /// Upper bound (exclusive) in seconds; `null` for the last bucket.
    pub below_secs: Option<u64>,
    pub count: u64,
}

/// How long ago the messages were dead-lettered.
#[derive(Debug, Clone, Serialize)]
pub struct AgeHistogram {
    pub buckets: Vec<AgeBucket>,
    /// Messages without a time to tell (no `x-death` and no timestamp property).
    pub unknown: u64,
    pub oldest_secs: Option<f64>,
    pub newest_secs: Option<f64>,
}

const AGE_BUCKETS: &[(&str, Option<u64>)] = &[
    ("<1m", Some(60)),
    ("1m-10m", Some(600)),
    ("10m-1h", Some(3600)),
    ("1h-6h", Some(6 * 3600)),
    ("6h-1d", Some(86_400)),
    ("1d-7d", Some(7 * 86_400)),
    (">=7d", None),
];

impl Default for AgeHistogram {
    fn default() -> Self {
        AgeHistogram {
            buckets: AGE_BUCKETS
                .iter()
                .map(|&(label, below_secs)| AgeBucket {
                    label,
                    below_secs,
                    count: 0,
                })
                .collect(),
            unknown: 0,
            oldest_secs: None,
            newest_secs: None,
        }
    }
}

impl AgeHistogram {
    pub fn add(&mut self, age_secs: Option<f64>) {
        let Some(age) = age_secs else {
            self.unknown += 1;
            return;
        };
        // A broker clock ahead of ours gives a small negative age: count it as just now.
        let age = age.max(0.0);
        if let Some(bucket) = self
            .buckets
            .iter_mut()
            .find(|bucket| bucket.below_secs.is_none_or(|below| age < below as f64))
        {
            bucket.count += 1;
        }
        self.oldest_secs = Some(self.oldest_secs.map_or(age, |oldest| oldest.max(age)));
        self.newest_secs = Some(self.newest_secs.map_or(age, |newest| newest.min(age)));
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DlqInspectReport {
    /// `rabbitmq` or `kafka`.
    pub broker: &'static str,
    pub name: String,
    /// How the messages were read without consuming them.
    pub method: String,
    /// Messages in the DLQ when the read began (RabbitMQ: ready ones; Kafka: from the oldest
    /// offset to the end).
    pub depth: Option<u64>,
    pub examined: u64,
    /// True when every message there was at the start was examined.
    pub complete: bool,
    pub by_reason: BTreeMap<String, u64>,
    /// RabbitMQ: the queue each message first died in.
    pub by_queue: BTreeMap<String, u64>,
    /// RabbitMQ: the routing key each message was first published with.
    pub by_routing_key: BTreeMap<String, u64>,
    /// Kafka: messages per partition of the dead-letter topic.
    pub by_partition: BTreeMap<i32, u64>,
    /// How often the messages were replayed already (`x-mqdrain-replays`).
    pub by_replays: BTreeMap<u64, u64>,
    pub age: AgeHistogram,
    pub warnings: Vec<Warning>,
}

impl DlqInspectReport {
    /// An empty report; `add` counts messages into it.
    pub fn new(broker: &'static str, name: &str, method: String) -> Self {
        DlqInspectReport {
            broker,
            name: name.to_string(),
            method,
            depth: None,
            examined: 0,
            complete: false,
            by_reason: BTreeMap::new(),
            by_queue: BTreeMap::new(),
            by_routing_key: BTreeMap::new(),
            by_partition: BTreeMap::new(),
            by_replays: BTreeMap::new(),
            age: AgeHistogram::default(),
            warnings: Vec::new(),
        }
    }

    pub fn add(&mut self, letter: &DeadLetter, now_ms: i64) {
        self.examined += 1;
        let text = |value: &Option<String>| value.clone().unwrap_or_else(|| NONE.to_string());
        *self.by_reason.entry(text(&letter.reason)).or_default() += 1;
        if self.broker == "rabbitmq" {
            *self.by_queue.entry(text(&letter.queue)).or_default() += 1;
            *self
                .by_routing_key
                .entry(text(&letter.routing_key))
                .or_default() += 1;
        }
        if let Some(partition) = letter.partition {
            *self.by_partition.entry(partition).or_default() += 1;
        }
        *self.by_replays.entry(letter.replays).or_default() += 1;
        self.age.add(
            letter
                .dead_at_ms
                .map(|dead_at| (now_ms - dead_at) as f64 / 1000.0),
        );
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DlqReplayOutcome {
    pub name: String,
    pub dry_run: bool,
    pub to: String,
    pub parking_lot: Option<String>,
    pub max_retries: u64,
    pub actions: Vec<String>,
    /// With `--dry-run`: messages looked at (read like `dlq inspect`, nothing moved).
    pub examined: u64,
    /// Republished to `--to` with the counter incremented (dry run: would be).
    pub replayed: u64,
    /// Moved to the parking lot (dry run: would be).
    pub parked: u64,
    /// At the budget without a parking lot: left in the DLQ.
    pub kept_at_budget: u64,
    /// Not matching `--filter`: left in the DLQ.
    pub skipped_by_filter: u64,
    pub warnings: Vec<Warning>,
    /// The forwarding loop's counters; `None` with `--dry-run`.
    pub result: Option<LoopOutcome>,
}

impl DlqReplayOutcome {
    /// Says how duplicates are suppressed, if they are; `native_id` names the broker's own id.
    pub fn describe_dedup(&mut self, spec: &DlqReplaySpec, native_id: &str) {
        self.actions.extend(crate::ops::dedup::describe(
            &spec.dedup_settings(),
            native_id,
            // Replay republishes the dead letter's own headers: no id is stamped.
            &format!("the key counting {REPLAYS_HEADER}"),
            self.dry_run,
        ));
    }

    pub fn new(spec: &DlqReplaySpec, dry_run: bool) -> Self {
        DlqReplayOutcome {
            name: spec.name.clone(),
            dry_run,
            to: spec.to.clone(),
            parking_lot: spec.parking_lot.clone(),
            max_retries: spec.max_retries,
            actions: Vec::new(),
            examined: 0,
            replayed: 0,
            parked: 0,
            kept_at_budget: 0,
            skipped_by_filter: 0,
            warnings: Vec::new(),
            result: None,
        }
    }

    /// Counts one message of a dry run where `rules` would send it.
    /// A dry run's result: where each peeked letter would go, what was read (`read` names how),
    /// and a `partial` warning when only `examined` of `total` could be read (`raise` says how
    /// to read them all).
    pub fn plan_dry_run(
        &mut self,
        destinations: impl IntoIterator<Item = Destination>,
        total: u64,
        read: String,
        rules: &str,
        unit: &str,
        raise: &str,
    ) {
        for destination in destinations {
            self.plan(destination);
        }
        self.actions.push(read);
        self.actions.push(format!("would {rules}"));
        if self.examined < total {
            self.warnings.push(Warning {
                code: "partial",
                message: format!(
                    "the dry run read {} of the {total} {unit}; {raise} to plan them all",
                    self.examined
                ),
            });
        }
    }

    pub fn plan(&mut self, destination: Destination) {
        self.examined += 1;
        match destination {
            Destination::Replay => self.replayed += 1,
            Destination::Park => self.parked += 1,
            Destination::KeepAtBudget => self.kept_at_budget += 1,
            Destination::Filtered => self.skipped_by_filter += 1,
        }
    }
}

/// Checks what both brokers share before anything is contacted.
pub fn validate_replay(spec: &DlqReplaySpec) -> Result<ReplayRules> {
    crate::ops::dedup::validate(&spec.dedup_settings())?;
    if spec.to == spec.name {
        return Err(Error::usage(format!(
            "--to '{}' is the dead-letter queue itself: give the queue or topic the messages should go back to",
            spec.to
        )));
    }
    if let Some(parking) = &spec.parking_lot {
        if parking == &spec.name || parking == &spec.to {
            return Err(Error::usage(format!(
                "--parking-lot '{parking}' must differ from the DLQ and from --to: parked messages wait there for manual handling"
            )));
        }
    }
    if spec.confirm_window == 0 {
        return Err(Error::usage("--confirm-window must be at least 1"));
    }
    if spec.max_attempts == 0 {
        return Err(Error::usage("--max-attempts must be at least 1"));
    }
    if spec.max_messages == Some(0) {
        return Err(Error::usage(
            "--max-messages must be at least 1 (leave it out to replay everything)",
        ));
    }
    if spec
        .rate_limit
        .is_some_and(|rate| !rate.is_finite() || rate <= 0.0)
    {
        return Err(Error::usage(
            "--rate-limit must be a positive number of messages per second",
        ));
    }
    ReplayRules::from_spec(spec)
}

/// The replay's rules in one sentence, for the actions list (`to` and `parking` are display
/// names such as "queue 'orders'").
pub fn describe_rules(spec: &DlqReplaySpec, to: &str, parking: Option<&str>) -> String {
    let rest = match parking {
        Some(parking) => format!("park the rest in {parking}"),
        None => "leave the rest in the DLQ (no --parking-lot)".to_string(),
    };
    let filter = if spec.filter.is_empty() {
        String::new()
    } else {
        format!(
            "; only messages matching --filter {} move, the others stay in the DLQ",
            spec.filter.join(" --filter ")
        )
    };
    format!(
        "replay to {to} what has x-mqdrain-replays below {} (the retry budget; incremented on the way), {rest}{filter}",
        spec.max_retries
    )
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or_default()
}

pub async fn inspect(
    target: &Target,
    spec: &DlqInspectSpec,
    progress: &Progress,
) -> Result<DlqInspectReport> {
    if spec.max_messages == 0 {
        return Err(Error::usage("--max-messages must be at least 1"));
    }
    match target {
        Target::Rabbit(rabbit) => rabbitmq::dlq::inspect(rabbit, spec, progress).await,
        Target::Kafka(kafka_target) => kafka::dlq::inspect(kafka_target, spec, progress).await,
    }
}

pub async fn replay(
    target: &Target,
    spec: &DlqReplaySpec,
    dry_run: bool,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<DlqReplayOutcome> {
    let rules = validate_replay(spec)?;
    match target {
        Target::Rabbit(rabbit) => {
            rabbitmq::dlq::replay(rabbit, spec, rules, dry_run, progress, cancel).await
        }
        Target::Kafka(kafka_target) => {
            kafka::dlq::replay(kafka_target, spec, rules, dry_run, progress, cancel).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(reason: &str, queue: &str, replays: u64) -> DeadLetter {
        DeadLetter {
            reason: Some(reason.to_string()),
            queue: Some(queue.to_string()),
            routing_key: Some("rk".to_string()),
            replays,
            ..DeadLetter::default()
        }
    }

    #[test]
    fn filters_parse_and_match_any_of_their_values() {
        let filter = Filter::parse("reason=expired,maxlen").unwrap();
        assert_eq!(filter.field, FilterField::Reason);
        assert!(filter.matches(&letter("expired", "q", 0)));
        assert!(filter.matches(&letter("maxlen", "q", 0)));
        assert!(!filter.matches(&letter("rejected", "q", 0)));
        let none = Filter::parse("reason=(none)").unwrap();
        assert!(none.matches(&DeadLetter::default()));
        assert!(Filter::parse("queue=orders")
            .unwrap()
            .matches(&letter("x", "orders", 0)));
        for bad in ["reason", "colour=red", "reason=", "=expired", "reason=,"] {
            let error = Filter::parse(bad).unwrap_err();
            assert!(matches!(error, Error::Usage { .. }), "{bad}: {error}");
        }
    }

    #[test]
    fn the_filter_comes_first_then_the_budget() {
        let rules = ReplayRules {
            filters: vec![Filter::parse("reason=expired").unwrap()],
            max_retries: 2,
            parking_lot: true,
        };
        assert_eq!(
            rules.destination(&letter("expired", "q", 0)),
            Destination::Replay
        );
        assert_eq!(
            rules.destination(&letter("expired", "q", 1)),
            Destination::Replay
        );
        assert_eq!(
            rules.destination(&letter("expired", "q", 2)),
            Destination::Park
        );
        assert_eq!(
            rules.destination(&letter("expired", "q", 9)),
            Destination::Park
        );
        assert_eq!(
            rules.destination(&letter("rejected", "q", 9)),
            Destination::Filtered
        );
        let no_lot = ReplayRules {
            filters: Vec::new(),
            max_retries: 0,
            parking_lot: false,
        };
        assert_eq!(
            no_lot.destination(&letter("rejected", "q", 0)),
            Destination::KeepAtBudget
        );
    }

    #[test]
    fn ages_fall_into_buckets_and_unknown_is_counted_apart() {
        let mut histogram = AgeHistogram::default();
        for age in [
            Some(0.5),
            Some(-3.0),
            Some(59.9),
            Some(60.0),
            Some(4000.0),
            Some(1e9),
            None,
        ] {
            histogram.add(age);
        }
        let counts: Vec<u64> = histogram
            .buckets
            .iter()
            .map(|bucket| bucket.count)
            .collect();
        assert_eq!(counts, vec![3, 1, 0, 1, 0, 0, 1]);
        assert_eq!(histogram.unknown, 1);
        assert_eq!(histogram.oldest_secs, Some(1e9));
        assert_eq!(histogram.newest_secs, Some(0.0));
    }

    #[test]
    fn reports_count_by_reason_queue_key_and_replays() {
        let mut report = DlqInspectReport::new("rabbitmq", "dlq", String::new());
        report.add(&letter("expired", "orders", 0), 10_000);
        report.add(&letter("expired", "orders", 1), 10_000);
        report.add(&DeadLetter::default(), 10_000);
        assert_eq!(report.examined, 3);
        assert_eq!(report.by_reason.get("expired"), Some(&2));
        assert_eq!(report.by_reason.get(NONE), Some(&1));
        assert_eq!(report.by_queue.get("orders"), Some(&2));
        assert_eq!(report.by_routing_key.get("rk"), Some(&2));
        assert_eq!(report.by_replays.get(&0), Some(&2));
        assert_eq!(report.age.unknown, 3);
    }

    #[test]
    fn replay_specs_refuse_loops_and_read_one_filter_or_many() {
        let spec: DlqReplaySpec =
            serde_yaml::from_str("{name: dlq, to: orders, filter: reason=expired}").unwrap();
        assert_eq!(spec.filter, vec!["reason=expired"]);
        assert_eq!(spec.max_retries, 3);
        assert!(validate_replay(&spec).is_ok());
        let spec: DlqReplaySpec =
            serde_yaml::from_str("{name: dlq, to: dlq, filter: [reason=expired, queue=a]}")
                .unwrap();
        assert_eq!(spec.filter.len(), 2);
        assert!(validate_replay(&spec).is_err());
        assert!(serde_yaml::from_str::<DlqReplaySpec>("{name: d, to: o, colour: red}").is_err());
        let spec: DlqReplaySpec =
            serde_yaml::from_str("{name: dlq, to: orders, parking_lot: orders}").unwrap();
        assert!(validate_replay(&spec).is_err());
        assert_eq!(parse_replays(b" 2 "), 2);
        assert_eq!(parse_replays(b"two"), 0);
    }
}
