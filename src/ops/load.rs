//! `mqdrain load`: a test and demo aid that seeds a backlog or consumes like an application.
//!
//! Not part of a drain. Its connections are named `load-generator ...` (Kafka: client id
//! `load-generator`), not mqdrain's prefix, so the drain steps see it as somebody else's
//! application — exactly what a demo needs.

use crate::broker::{kafka, rabbitmq};
use crate::endpoint::Target;
use crate::error::{Error, Result};
use crate::progress::{Event, Progress};
use serde::Serialize;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Connection-name prefix of the load generator.
pub const LOAD_CONNECTION_PREFIX: &str = "load-generator ";

#[derive(Debug, Clone)]
pub struct PublishSpec {
    pub queue: String,
    pub count: u64,
    pub size: usize,
    pub rate: Option<f64>,
    /// Keys cycle through `key-0` .. `key-(keys-1)` (RabbitMQ: a `key` header; Kafka: the record key).
    pub keys: u32,
    pub declare: bool,
    /// Kafka: partitions of a topic that `declare` creates.
    pub partitions: Option<i32>,
}

#[derive(Debug, Clone)]
pub struct ConsumeSpec {
    pub queue: String,
    /// Kafka: the consumer group to consume and commit under (required there).
    pub group: Option<String>,
    pub rate: Option<f64>,
    pub until_empty: bool,
    pub idle: Duration,
    pub max: Option<u64>,
    pub prefetch: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadOutcome {
    pub queue: String,
    /// Published and confirmed, or consumed and acknowledged.
    pub messages: u64,
    pub elapsed_secs: f64,
    pub rate: f64,
    /// Why a consumer stopped: `max`, `empty` or `signal`; `count` for publish.
    pub stopped_by: &'static str,
}

/// Sleeps so that `done` messages take at least `done / rate` seconds.
pub async fn pace(rate: Option<f64>, started: Instant, done: u64) {
    if let Some(rate) = rate {
        let due = Duration::from_secs_f64(done as f64 / rate);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// A message body of `size` bytes that is readable in a queue browser.
pub fn body(size: usize) -> Vec<u8> {
    (0..size).map(|index| b'a' + (index % 26) as u8).collect()
}

/// Progress of a publisher or consumer: `done` so far, `in_flight` not yet confirmed.
pub fn progress_event(done: u64, in_flight: usize, started: Instant) -> Event {
    Event::Forwarded {
        forwarded: done,
        in_flight: in_flight as u64,
        retries: 0,
        rate: done as f64 / started.elapsed().as_secs_f64().max(0.001),
    }
}

pub fn outcome(
    queue: &str,
    messages: u64,
    started: Instant,
    stopped_by: &'static str,
) -> LoadOutcome {
    let elapsed_secs = started.elapsed().as_secs_f64();
    LoadOutcome {
        queue: queue.to_string(),
        messages,
        elapsed_secs,
        rate: if elapsed_secs > 0.0 {
            messages as f64 / elapsed_secs
        } else {
            0.0
        },
        stopped_by,
    }
}

fn validate_rate(rate: Option<f64>) -> Result<()> {
    if rate.is_some_and(|rate| !rate.is_finite() || rate <= 0.0) {
        return Err(Error::usage(
            "--rate must be a positive number of messages per second",
        ));
    }
    Ok(())
}

pub async fn publish(
    target: &Target,
    spec: &PublishSpec,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<LoadOutcome> {
    validate_rate(spec.rate)?;
    if spec.keys == 0 {
        return Err(Error::usage("--keys must be at least 1"));
    }
    match target {
        Target::Rabbit(_) if spec.partitions.is_some() => Err(Error::usage(
            "--partitions is for Kafka topics; a RabbitMQ queue has none",
        )),
        Target::Rabbit(rabbit) => rabbitmq::load::publish(rabbit, spec, progress, cancel).await,
        Target::Kafka(_) if spec.partitions.is_some_and(|partitions| partitions < 1) => {
            Err(Error::usage("--partitions must be at least 1"))
        }
        Target::Kafka(kafka_target) => {
            kafka::load::publish(kafka_target, spec, progress, cancel).await
        }
    }
}

pub async fn consume(
    target: &Target,
    spec: &ConsumeSpec,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<LoadOutcome> {
    validate_rate(spec.rate)?;
    if spec.prefetch == 0 {
        return Err(Error::usage("--prefetch must be at least 1"));
    }
    match (target, &spec.group) {
        (Target::Rabbit(_), Some(_)) => Err(Error::usage(
            "--group is for Kafka; a RabbitMQ consumer consumes the queue itself",
        )),
        (Target::Rabbit(rabbit), None) => {
            rabbitmq::load::consume(rabbit, spec, progress, cancel).await
        }
        (Target::Kafka(kafka_target), Some(group)) => {
            kafka::load::consume(kafka_target, spec, group, progress, cancel).await
        }
        (Target::Kafka(_), None) => Err(Error::usage(format!(
            "consuming topic '{}' needs --group: the consumer group that reads and commits",
            spec.queue
        ))),
    }
}
