//! `mqdrain load`: a test and demo aid that seeds a backlog or consumes like an application.
//!
//! Not part of a drain. Its connections are named `load-generator ...` (not mqdrain's prefix), so
//! the drain steps see it as somebody else's application — exactly what a demo needs.

use crate::broker::rabbitmq;
use crate::endpoint::Target;
use crate::error::{Error, Result};
use crate::progress::Progress;
use serde::Serialize;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Connection-name prefix of the load generator.
pub const LOAD_CONNECTION_PREFIX: &str = "load-generator ";

#[derive(Debug, Clone)]
pub struct PublishSpec {
    pub queue: String,
    pub count: u64,
    pub size: usize,
    pub rate: Option<f64>,
    /// Routing keys cycle through `key-0` .. `key-(keys-1)`.
    pub keys: u32,
    pub declare: bool,
}

#[derive(Debug, Clone)]
pub struct ConsumeSpec {
    pub queue: String,
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
        Target::Rabbit(rabbit) => rabbitmq::load::publish(rabbit, spec, progress, cancel).await,
        Target::Kafka(_) => Err(Error::usage(
            "mqdrain load supports RabbitMQ only; for Kafka use kcat or kafka-producer-perf-test",
        )),
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
    match target {
        Target::Rabbit(rabbit) => rabbitmq::load::consume(rabbit, spec, progress, cancel).await,
        Target::Kafka(_) => Err(Error::usage(
            "mqdrain load supports RabbitMQ only; for Kafka use kcat or kafka-console-consumer",
        )),
    }
}
