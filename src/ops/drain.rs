//! Specs and outcomes of the drain-cycle steps (stop-consumers, expand, forward, watch, restore),
//! shared by the CLI, playbooks and both brokers; `execute_*` dispatch to the broker side.

use crate::broker::{kafka, rabbitmq};
use crate::endpoint::Target;
use crate::error::{Error, Result};
use crate::ops::dedup::DedupSettings;
use crate::ops::exec::ExecOutcome;
use crate::ops::forward_loop::{LoopOutcome, Strategy};
use crate::ops::plan::{self, PlanSpec};
use crate::progress::{Event, Progress};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Upper bound for `--factor`: more temporary queues or partition multiples than this is a typo.
pub const MAX_FACTOR: usize = 1000;

fn secs(value: u64) -> Duration {
    Duration::from_secs(value)
}
fn default_exec_timeout() -> Duration {
    secs(120)
}
fn default_wait() -> Duration {
    secs(60)
}
fn default_prefetch() -> u16 {
    2000
}
fn default_window() -> usize {
    1000
}
fn default_ack_batch() -> usize {
    100
}
fn default_attempts() -> u32 {
    5
}
fn default_interval() -> Duration {
    secs(2)
}
fn default_strategy() -> Strategy {
    Strategy::RoundRobin
}
fn default_key() -> String {
    "routing-key".to_string()
}

/// A client still attached to the backlog: an AMQP consumer or a Kafka group member.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClientRef {
    /// Connection name (RabbitMQ) or member id (Kafka).
    pub id: String,
    pub host: Option<String>,
    /// User (RabbitMQ) or client id (Kafka).
    pub who: Option<String>,
}

impl std::fmt::Display for ClientRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (host {}, {})",
            self.id,
            self.host.as_deref().unwrap_or("?"),
            self.who.as_deref().unwrap_or("?")
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopConsumersSpec {
    pub name: String,
    #[serde(default)]
    pub group: Option<String>,
    /// The operator's own stop command, run first.
    #[serde(default)]
    pub exec: Option<String>,
    #[serde(default = "default_exec_timeout", with = "crate::ops::duration_text")]
    pub exec_timeout: Duration,
    /// RabbitMQ: close the consumers' connections through the management API.
    #[serde(default)]
    pub close_connections: bool,
    /// How long the consumer count may take to reach zero and stay there.
    #[serde(default = "default_wait", with = "crate::ops::duration_text")]
    pub wait: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct StopConsumersOutcome {
    pub name: String,
    pub dry_run: bool,
    pub exec: Option<ExecOutcome>,
    /// What was done, or with `--dry-run` what would be done.
    pub actions: Vec<String>,
    /// Clients still attached (empty on success).
    pub remaining: Vec<ClientRef>,
}

/// `expand`'s factor: a number of temporary queues (partition multiplier), or `auto`: the
/// smallest that drains within `target`, computed by `ops::plan` from measured rates. Written as
/// a number or `"auto"` in specs and playbooks, so existing `factor: 8` keeps working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    Count(usize),
    Auto,
}

impl std::fmt::Display for Factor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Factor::Count(count) => write!(f, "{count}"),
            Factor::Auto => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for Factor {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text.trim() {
            "auto" => Ok(Factor::Auto),
            number => number.parse().map(Factor::Count).map_err(|_| {
                format!("'{text}' is not a factor: give a whole number of temporary queues (partition multiplier) or auto")
            }),
        }
    }
}

impl Serialize for Factor {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Factor::Count(count) => serializer.serialize_u64(*count as u64),
            Factor::Auto => serializer.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Factor {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Factor;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a whole number (temporary queues, or the partition multiplier) or auto",
                )
            }

            fn visit_u64<E: serde::de::Error>(self, value: u64) -> std::result::Result<Factor, E> {
                usize::try_from(value)
                    .map(Factor::Count)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(value), &self))
            }

            fn visit_i64<E: serde::de::Error>(self, value: i64) -> std::result::Result<Factor, E> {
                usize::try_from(value)
                    .map(Factor::Count)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(value), &self))
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> std::result::Result<Factor, E> {
                match value {
                    "auto" => Ok(Factor::Auto),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpandSpec {
    pub name: String,
    pub factor: Factor,
    /// RabbitMQ: prefix of the temporary queues (`<queue>.drain`); Kafka: the temporary topic
    /// (`<topic>.drain`).
    #[serde(default)]
    pub temp: Option<String>,
    /// Accept a different factor than what exists.
    #[serde(default)]
    pub force: bool,
    /// With `factor: auto`: the drain must finish within this.
    #[serde(default, with = "crate::ops::duration_text::option")]
    pub target: Option<Duration>,
    /// With `factor: auto` on Kafka: the group whose lag and throughput are measured.
    #[serde(default)]
    pub group: Option<String>,
    /// With `factor: auto`: see `ops::plan::PlanSpec`.
    #[serde(default)]
    pub per_consumer_rate: Option<f64>,
    #[serde(default)]
    pub forwarder_rate: Option<f64>,
    #[serde(default = "default_plan_sample", with = "crate::ops::duration_text")]
    pub sample: Duration,
}

fn default_plan_sample() -> Duration {
    secs(5)
}

impl ExpandSpec {
    /// Checks the factor and the options that only `auto` uses, before anything is measured.
    pub fn check_factor(&self) -> Result<()> {
        match (self.factor, self.target) {
            (Factor::Count(count), None) => crate::ops::validate_factor(count),
            (Factor::Count(_), Some(_)) => Err(Error::usage(
                "--target only applies to --factor auto (the factor is then computed to drain within it)",
            )),
            (Factor::Auto, None) => Err(Error::usage(
                "--factor auto needs --target <duration>: the time the drain must finish within, e.g. 30m",
            )),
            (Factor::Auto, Some(_)) => Ok(()),
        }
    }

    fn plan_spec(&self, target: Duration) -> PlanSpec {
        PlanSpec {
            name: self.name.clone(),
            group: self.group.clone(),
            target,
            per_consumer_rate: self.per_consumer_rate,
            sample: self.sample,
            forwarder_rate: self.forwarder_rate,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ExpandOutcome {
    pub name: String,
    pub dry_run: bool,
    /// Temporary queues, or the temporary topic.
    pub temporary: Vec<String>,
    /// Kafka: partitions of the temporary topic.
    pub partitions: Option<i32>,
    /// True when everything already existed as asked (a rerun).
    pub unchanged: bool,
    pub actions: Vec<String>,
    /// Settings copied from the original: name, value.
    pub copied_settings: Vec<(String, String)>,
    /// Settings of the original not carried over, each with the reason.
    pub dropped_settings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardSpec {
    pub name: String,
    #[serde(default)]
    pub group: Option<String>,
    /// RabbitMQ: the number of temporary queues to find; Kafka: the partition multiplier.
    #[serde(default)]
    pub factor: Option<usize>,
    /// RabbitMQ: explicit target queues instead of the temporary ones.
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default)]
    pub temp: Option<String>,
    #[serde(default = "default_strategy")]
    pub strategy: Strategy,
    /// `routing-key`, `message-id` or `header:<name>` (Kafka: the record key unless `header:`).
    #[serde(default = "default_key")]
    pub key: String,
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    #[serde(default = "default_window")]
    pub confirm_window: usize,
    #[serde(default = "default_ack_batch")]
    pub ack_batch: usize,
    #[serde(default)]
    pub max_messages: Option<u64>,
    /// Stop once the source stayed empty this long; `None` runs until stopped.
    #[serde(default, with = "crate::ops::duration_text::option")]
    pub idle_timeout: Option<Duration>,
    #[serde(default)]
    pub rate_limit: Option<f64>,
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Redis URL (`redis://host:port[/db]`) for duplicate suppression; see `ops::dedup`.
    #[serde(default)]
    pub dedup: Option<String>,
    /// How long a delivered id is remembered.
    #[serde(
        default = "crate::ops::dedup::default_ttl",
        with = "crate::ops::duration_text"
    )]
    pub dedup_ttl: Duration,
    /// How long an in-flight mark protects a message being published; older marks of another
    /// forwarder are stale.
    #[serde(
        default = "crate::ops::dedup::default_inflight_ttl",
        with = "crate::ops::duration_text"
    )]
    pub dedup_inflight_ttl: Duration,
    /// Header carrying the stable id, instead of the broker's own (message-id property; Kafka
    /// topic-partition-offset).
    #[serde(default)]
    pub id_header: Option<String>,
    /// Forward without suppression (with a warning) when Redis fails, instead of stopping.
    #[serde(default)]
    pub dedup_optional: bool,
}

impl ForwardSpec {
    pub fn dedup_settings(&self) -> DedupSettings {
        DedupSettings {
            url: self.dedup.clone(),
            ttl: self.dedup_ttl,
            inflight_ttl: self.dedup_inflight_ttl,
            id_header: self.id_header.clone(),
            optional: self.dedup_optional,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ForwardOutcome {
    pub name: String,
    pub dry_run: bool,
    pub targets: Vec<String>,
    pub actions: Vec<String>,
    /// `None` with `--dry-run`.
    pub result: Option<LoopOutcome>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchSpec {
    pub name: String,
    #[serde(default)]
    pub group: Option<String>,
    /// Kafka: the temporary consumers' group on the temporary topic.
    #[serde(default)]
    pub temp_group: Option<String>,
    #[serde(default)]
    pub temp: Option<String>,
    /// Exit 0 once the source and every temporary queue/partition are empty (seen twice).
    #[serde(default)]
    pub until_drained: bool,
    #[serde(default, with = "crate::ops::duration_text::option")]
    pub timeout: Option<Duration>,
    #[serde(default = "default_interval", with = "crate::ops::duration_text")]
    pub interval: Duration,
}

/// One watch sample: the backlog of the source and of each temporary queue/partition.
#[derive(Debug, Clone, Serialize)]
pub struct WatchSample {
    pub at_secs: f64,
    pub source: Backlog,
    pub temporary: Vec<Backlog>,
    /// Sum of every backlog; `None` if any is unknown.
    pub total: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Backlog {
    pub name: String,
    /// Ready + unacked (RabbitMQ) or lag (Kafka); `None` when unknown.
    pub depth: Option<u64>,
    pub in_rate: Option<f64>,
    pub out_rate: Option<f64>,
    pub eta_secs: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WatchOutcome {
    pub name: String,
    pub drained: bool,
    pub samples: usize,
    pub last: Option<WatchSample>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreSpec {
    pub name: String,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub temp_group: Option<String>,
    #[serde(default)]
    pub temp: Option<String>,
    /// Wait this long for the temporary topology to drain before giving up.
    #[serde(default, with = "crate::ops::duration_text::option")]
    pub wait: Option<Duration>,
    /// The operator's command that restarts the original consumers.
    #[serde(default)]
    pub exec: Option<String>,
    #[serde(default = "default_exec_timeout", with = "crate::ops::duration_text")]
    pub exec_timeout: Duration,
    /// Kafka: also delete the temporary group's committed offsets.
    #[serde(default)]
    pub delete_temp_group: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreOutcome {
    pub name: String,
    pub dry_run: bool,
    pub exec: Option<ExecOutcome>,
    pub deleted: Vec<String>,
    pub actions: Vec<String>,
}

pub async fn stop_consumers(
    target: &Target,
    spec: &StopConsumersSpec,
    dry_run: bool,
    progress: &Progress,
) -> Result<StopConsumersOutcome> {
    match target {
        Target::Rabbit(rabbit) => {
            rabbitmq::drain::stop_consumers(rabbit, spec, dry_run, progress).await
        }
        Target::Kafka(kafka) => kafka::drain::stop_consumers(kafka, spec, dry_run, progress).await,
    }
}

pub async fn expand(
    target: &Target,
    spec: &ExpandSpec,
    dry_run: bool,
    progress: &Progress,
) -> Result<ExpandOutcome> {
    spec.check_factor()?;
    let (factor, planned) = match (spec.factor, spec.target) {
        (Factor::Count(count), _) => (count, None),
        (Factor::Auto, target_time) => {
            let time = target_time.unwrap_or_default();
            let report = plan::execute(target, &spec.plan_spec(time), progress).await?;
            let Some(factor) = report.plan.factor else {
                return Err(Error::Broker(format!(
                    "--factor auto: {}. {}",
                    plan::summary(&report),
                    report.plan.warnings.join(" ")
                )));
            };
            (factor, Some(report))
        }
    };
    crate::ops::validate_factor(factor)?;
    let mut outcome = match target {
        Target::Rabbit(rabbit) => {
            rabbitmq::drain::expand(rabbit, spec, factor, dry_run, progress).await?
        }
        Target::Kafka(kafka) => {
            kafka::drain::expand(kafka, spec, factor, dry_run, progress).await?
        }
    };
    if let Some(report) = planned {
        // The plan's reasoning leads the actions, warnings (forwarder-bound) included.
        let mut lines = vec![plan::summary(&report)];
        lines.extend(report.plan.warnings.iter().cloned());
        outcome.actions.splice(0..0, lines);
    }
    Ok(outcome)
}

pub async fn forward(
    target: &Target,
    spec: &ForwardSpec,
    dry_run: bool,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<ForwardOutcome> {
    if let Some(factor) = spec.factor {
        crate::ops::validate_factor(factor)?;
    }
    crate::ops::dedup::validate(&spec.dedup_settings())?;
    match target {
        Target::Rabbit(rabbit) => {
            rabbitmq::drain::forward(rabbit, spec, dry_run, progress, cancel).await
        }
        Target::Kafka(kafka) => kafka::drain::forward(kafka, spec, dry_run, progress, cancel).await,
    }
}

/// A broker's reading of a drain, sampled by [`watch_with`]: the source's backlog and each
/// temporary queue's or partition's.
pub trait WatchSampler: Send {
    fn sample(&mut self) -> impl Future<Output = Result<(Backlog, Vec<Backlog>)>> + Send;

    /// What is still left when `--timeout` runs out, in the broker's terms.
    fn timeout_message(&self, last: &WatchSample, timeout: Duration) -> String;
}

/// The watch loop for both brokers: samples every `interval`, emits a `Backlog` event per queue
/// or partition, and ends once drained (empty in two samples in a row, with `until_drained`),
/// at the timeout (an error), or on cancellation.
pub async fn watch_with<S: WatchSampler>(
    spec: &WatchSpec,
    interval: Duration,
    mut sampler: S,
    progress: &Progress,
    cancel: &CancellationToken,
    on_sample: &mut (dyn FnMut(&WatchSample) + Send),
) -> Result<WatchOutcome> {
    let started = Instant::now();
    let mut samples = 0;
    let mut empty_in_a_row = 0;
    let finished = |progress: &Progress| {
        progress.emit(Event::StepFinished {
            step: "watch".into(),
        })
    };
    loop {
        let (source, temporary) = sampler.sample().await?;
        let total = std::iter::once(&source)
            .chain(temporary.iter())
            .map(|backlog| backlog.depth)
            .sum::<Option<u64>>();
        let sample = WatchSample {
            at_secs: started.elapsed().as_secs_f64(),
            source,
            temporary,
            total,
        };
        for backlog in std::iter::once(&sample.source).chain(sample.temporary.iter()) {
            progress.emit(Event::Backlog {
                name: backlog.name.clone(),
                depth: backlog.depth,
                in_rate: backlog.in_rate,
                out_rate: backlog.out_rate,
                eta_secs: backlog.eta_secs,
            });
        }
        on_sample(&sample);
        samples += 1;
        empty_in_a_row = if total == Some(0) {
            empty_in_a_row + 1
        } else {
            0
        };
        if spec.until_drained && empty_in_a_row >= 2 {
            finished(progress);
            return Ok(WatchOutcome {
                name: spec.name.clone(),
                drained: true,
                samples,
                last: Some(sample),
            });
        }
        if let Some(timeout) = spec.timeout {
            if started.elapsed() >= timeout {
                finished(progress);
                return Err(Error::Timeout(sampler.timeout_message(&sample, timeout)));
            }
        }
        let next = spec
            .timeout
            .map_or(interval, |timeout| {
                interval.min(timeout.saturating_sub(started.elapsed()))
            })
            .max(Duration::from_millis(10));
        tokio::select! {
            _ = cancel.cancelled() => {
                finished(progress);
                return Err(Error::Cancelled);
            }
            _ = tokio::time::sleep(next) => {}
        }
    }
}

/// Samples until drained, timed out or cancelled; each sample goes to `on_sample`.
pub async fn watch(
    target: &Target,
    spec: &WatchSpec,
    progress: &Progress,
    cancel: &CancellationToken,
    on_sample: &mut (dyn FnMut(&WatchSample) + Send),
) -> Result<WatchOutcome> {
    match target {
        Target::Rabbit(rabbit) => {
            rabbitmq::drain::watch(rabbit, spec, progress, cancel, on_sample).await
        }
        Target::Kafka(kafka) => kafka::drain::watch(kafka, spec, progress, cancel, on_sample).await,
    }
}

pub async fn restore(
    target: &Target,
    spec: &RestoreSpec,
    dry_run: bool,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<RestoreOutcome> {
    match target {
        Target::Rabbit(rabbit) => {
            rabbitmq::drain::restore(rabbit, spec, dry_run, progress, cancel).await
        }
        Target::Kafka(kafka) => kafka::drain::restore(kafka, spec, dry_run, progress, cancel).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(yaml: &str) -> std::result::Result<ExpandSpec, String> {
        serde_yaml::from_str(yaml).map_err(|error| error.to_string())
    }

    #[test]
    fn factor_is_a_number_or_auto() {
        let spec = expand("name: q\nfactor: 8\n").expect("number");
        assert_eq!(spec.factor, Factor::Count(8));
        assert!(spec.check_factor().is_ok());
        let spec = expand("name: q\nfactor: auto\ntarget: 30m\n").expect("auto");
        assert_eq!(spec.factor, Factor::Auto);
        assert_eq!(spec.target, Some(Duration::from_secs(1800)));
        assert!(spec.check_factor().is_ok());
        let error = expand("name: q\nfactor: lots\n").unwrap_err();
        assert!(error.contains("expected a whole number"), "{error}");
        assert!(expand("name: q\nfactor: -2\n").is_err());
        assert_eq!("auto".parse::<Factor>(), Ok(Factor::Auto));
        assert_eq!("12".parse::<Factor>(), Ok(Factor::Count(12)));
        assert!("x".parse::<Factor>().is_err());
        assert_eq!(
            serde_json::to_value(Factor::Auto).ok(),
            Some(serde_json::json!("auto"))
        );
    }

    #[test]
    fn auto_needs_a_target_and_only_auto_takes_one() {
        let auto = expand("name: q\nfactor: auto\n").expect("parses");
        assert!(auto
            .check_factor()
            .unwrap_err()
            .to_string()
            .contains("--target"));
        let both = expand("name: q\nfactor: 3\ntarget: 10m\n").expect("parses");
        assert!(both.check_factor().is_err());
        let zero = expand("name: q\nfactor: 0\n").expect("parses");
        assert!(zero.check_factor().is_err());
    }
}
