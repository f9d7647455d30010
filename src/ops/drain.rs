//! Specs and outcomes of the drain-cycle steps (stop-consumers, expand, forward, watch, restore),
//! shared by the CLI, playbooks and both brokers; `execute_*` dispatch to the broker side.

use crate::broker::{kafka, rabbitmq};
use crate::endpoint::Target;
use crate::error::{Error, Result};
use crate::ops::exec::ExecOutcome;
use crate::ops::forward_loop::{LoopOutcome, Strategy};
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpandSpec {
    pub name: String,
    pub factor: usize,
    /// RabbitMQ: prefix of the temporary queues (`<queue>.drain`); Kafka: the temporary topic
    /// (`<topic>.drain`).
    #[serde(default)]
    pub temp: Option<String>,
    /// Accept a different factor than what exists.
    #[serde(default)]
    pub force: bool,
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
    crate::ops::validate_factor(spec.factor)?;
    match target {
        Target::Rabbit(rabbit) => rabbitmq::drain::expand(rabbit, spec, dry_run, progress).await,
        Target::Kafka(kafka) => kafka::drain::expand(kafka, spec, dry_run, progress).await,
    }
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
