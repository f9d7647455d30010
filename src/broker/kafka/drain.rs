//! The drain cycle on Kafka: stop-consumers, expand, forward, watch, restore.
//!
//! Being built on the `kafka-drain` branch; until it lands every step says so and exits 2.

use crate::endpoint::KafkaTarget;
use crate::error::{Error, Result};
use crate::ops::drain::*;
use crate::progress::Progress;
use tokio_util::sync::CancellationToken;

fn not_yet(step: &str) -> Error {
    Error::usage(format!("{step} is not available for Kafka in this build"))
}

pub async fn stop_consumers(
    _target: &KafkaTarget,
    _spec: &StopConsumersSpec,
    _dry_run: bool,
    _progress: &Progress,
) -> Result<StopConsumersOutcome> {
    Err(not_yet("stop-consumers"))
}

pub async fn expand(
    _target: &KafkaTarget,
    _spec: &ExpandSpec,
    _dry_run: bool,
    _progress: &Progress,
) -> Result<ExpandOutcome> {
    Err(not_yet("expand"))
}

pub async fn forward(
    _target: &KafkaTarget,
    _spec: &ForwardSpec,
    _dry_run: bool,
    _progress: &Progress,
    _cancel: &CancellationToken,
) -> Result<ForwardOutcome> {
    Err(not_yet("forward"))
}

pub async fn watch(
    _target: &KafkaTarget,
    _spec: &WatchSpec,
    _progress: &Progress,
    _cancel: &CancellationToken,
    _on_sample: &mut (dyn FnMut(&WatchSample) + Send),
) -> Result<WatchOutcome> {
    Err(not_yet("watch"))
}

pub async fn restore(
    _target: &KafkaTarget,
    _spec: &RestoreSpec,
    _dry_run: bool,
    _progress: &Progress,
    _cancel: &CancellationToken,
) -> Result<RestoreOutcome> {
    Err(not_yet("restore"))
}
