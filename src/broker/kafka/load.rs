//! The load generator on Kafka: an acks=all producer spreading records over the partitions, and
//! a rate-limited group member that commits what it consumed.

use super::client::{self, request_error};
use super::drain::create_topic;
use super::inspect::partition_ids;
use crate::endpoint::KafkaTarget;
use crate::error::{Error, Result};
use crate::ops::load::{
    body, outcome, pace, progress_event, ConsumeSpec, LoadOutcome, PublishSpec,
};
use crate::progress::{Event, Progress};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::FutureRecord;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Client id of every load-generator client: not mqdrain's, so the drain steps treat it as an
/// application.
const CLIENT_ID: &str = "load-generator";
/// Deliveries awaited at a time: enough for throughput, bounded for memory.
const PUBLISH_WINDOW: usize = 500;
const DEFAULT_PARTITIONS: i32 = 3;
/// How often the consumer commits what it consumed (and reports progress).
const COMMIT_EVERY: Duration = Duration::from_millis(500);

/// The topic's partitions; with `declare`, creates the topic first when it does not exist.
async fn topic_partitions(target: &KafkaTarget, spec: &PublishSpec) -> Result<Vec<i32>> {
    let observer = Arc::new(client::observer(target, CLIENT_ID)?);
    match partition_ids(target, &observer, &spec.queue).await {
        Err(Error::NotFound { .. }) if spec.declare => {}
        found => return found,
    }
    let partitions = spec.partitions.unwrap_or(DEFAULT_PARTITIONS);
    create_topic(target, &spec.queue, partitions, 1, &[]).await?;
    // A new topic's metadata reaches every broker a moment after it was created.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match partition_ids(target, &observer, &spec.queue).await {
            Ok(ids) if ids.len() == partitions as usize => return Ok(ids),
            Err(error) if Instant::now() >= deadline => return Err(error),
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

pub async fn publish(
    target: &KafkaTarget,
    spec: &PublishSpec,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<LoadOutcome> {
    progress.emit(Event::StepStarted {
        step: "load publish".into(),
        detail: format!(
            "{} records of {} bytes into topic '{}'",
            spec.count, spec.size, spec.queue
        ),
    });
    let partitions = topic_partitions(target, spec).await?;
    let producer = client::confirming_producer(target, CLIENT_ID, "load", &[])?;
    let body = body(spec.size);
    let started = Instant::now();
    let mut pending = VecDeque::new();
    let mut delivered = 0u64;
    let mut stopped_by = "count";
    for index in 0..spec.count {
        if cancel.is_cancelled() {
            stopped_by = "signal";
            break;
        }
        pace(spec.rate, started, index).await;
        // Round-robin, so every partition gets its share of the backlog.
        let partition = partitions[(index % partitions.len() as u64) as usize];
        let key = format!("key-{}", index % u64::from(spec.keys));
        let record = FutureRecord::to(&spec.queue)
            .partition(partition)
            .key(&key)
            .payload(&body);
        let delivery = producer
            .send_result(record)
            .map_err(|(error, _)| request_error(target, "queueing a record", &error))?;
        pending.push_back(delivery);
        if pending.len() >= PUBLISH_WINDOW {
            delivered += settle(&mut pending, PUBLISH_WINDOW / 2, target, &spec.queue).await?;
            progress.emit(progress_event(delivered, pending.len(), started));
        }
    }
    let all = pending.len();
    delivered += settle(&mut pending, all, target, &spec.queue).await?;
    progress.emit(Event::StepFinished {
        step: "load publish".into(),
    });
    Ok(outcome(&spec.queue, delivered, started, stopped_by))
}

/// Waits for the oldest `count` deliveries; a refused record is an error.
async fn settle(
    pending: &mut VecDeque<rdkafka::producer::DeliveryFuture>,
    count: usize,
    target: &KafkaTarget,
    topic: &str,
) -> Result<u64> {
    let mut delivered = 0;
    for _ in 0..count {
        let Some(delivery) = pending.pop_front() else {
            break;
        };
        match delivery.await {
            Ok(Ok(_)) => delivered += 1,
            Ok(Err((error, _))) => {
                return Err(request_error(
                    target,
                    &format!("producing to topic '{topic}'"),
                    &error,
                ))
            }
            Err(_) => {
                return Err(Error::Broker(format!(
                    "the Kafka producer for topic '{topic}' stopped before confirming a record"
                )))
            }
        }
    }
    Ok(delivered)
}

pub async fn consume(
    target: &KafkaTarget,
    spec: &ConsumeSpec,
    group: &str,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<LoadOutcome> {
    progress.emit(Event::StepStarted {
        step: "load consume".into(),
        detail: format!("topic '{}' as group '{group}'", spec.queue),
    });
    // Subscribing to a missing topic would wait for ever; say so at once instead.
    let observer = Arc::new(client::observer(target, group)?);
    partition_ids(target, &observer, &spec.queue).await?;
    let mut config = client::base_config(target, CLIENT_ID);
    config
        .set("group.id", group)
        // Commits name exactly the records handed to this loop: offsets are stored on delivery.
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false");
    let consumer: StreamConsumer = config
        .create()
        .map_err(|error| client::client_setup_error(target, "load consumer", &error))?;
    consumer
        .subscribe(&[spec.queue.as_str()])
        .map_err(|error| {
            request_error(
                target,
                &format!("subscribing to topic '{}'", spec.queue),
                &error,
            )
        })?;
    let started = Instant::now();
    let mut consumed = 0u64;
    let mut committed = 0u64;
    let mut idle_since = Instant::now();
    let mut last_commit = Instant::now();
    let poll = Duration::from_millis(250);
    let stopped_by = loop {
        if spec.max.is_some_and(|max| consumed >= max) {
            break "max";
        }
        if last_commit.elapsed() >= COMMIT_EVERY && consumed > committed {
            commit(&consumer, target, CommitMode::Async)?;
            committed = consumed;
            last_commit = Instant::now();
            progress.emit(progress_event(consumed, 0, started));
        }
        let next = tokio::select! {
            _ = cancel.cancelled() => break "signal",
            next = tokio::time::timeout(poll, consumer.recv()) => next,
        };
        match next {
            Err(_) => {
                // Joining the group takes seconds: idle time counts only once partitions are ours.
                let assigned = consumer
                    .assignment()
                    .is_ok_and(|assignment| assignment.count() > 0);
                if !assigned {
                    idle_since = Instant::now();
                } else if spec.until_empty && idle_since.elapsed() >= spec.idle {
                    break "empty";
                }
            }
            Ok(Err(error)) => {
                return Err(request_error(
                    target,
                    &format!("consuming topic '{}'", spec.queue),
                    &error,
                ))
            }
            Ok(Ok(_)) => {
                consumed += 1;
                idle_since = Instant::now();
                pace(spec.rate, started, consumed).await;
            }
        }
    };
    if consumed > 0 {
        commit(&consumer, target, CommitMode::Sync)?;
    }
    // Dropping the consumer leaves the group.
    drop(consumer);
    progress.emit(Event::StepFinished {
        step: "load consume".into(),
    });
    Ok(outcome(&spec.queue, consumed, started, stopped_by))
}

fn commit(consumer: &StreamConsumer, target: &KafkaTarget, mode: CommitMode) -> Result<()> {
    match consumer.commit_consumer_state(mode) {
        // Nothing new was stored since the last commit.
        Err(error) if error.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => Ok(()),
        result => result.map_err(|error| request_error(target, "committing offsets", &error)),
    }
}
