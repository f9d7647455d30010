//! The load generator on RabbitMQ: a confirming publisher and a rate-limited acking consumer.

use super::amqp::{self, channel_error, connection_error};
use crate::endpoint::RabbitTarget;
use crate::error::{Error, Result};
use crate::ops::load::{
    body, outcome, pace, progress_event, ConsumeSpec, LoadOutcome, PublishSpec,
    LOAD_CONNECTION_PREFIX,
};
use crate::progress::{Event, Progress};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Unconfirmed publishes kept in flight: enough for throughput, bounded for memory.
const PUBLISH_WINDOW: usize = 500;

pub async fn publish(
    target: &RabbitTarget,
    spec: &PublishSpec,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<LoadOutcome> {
    amqp::check_queue_name(&spec.queue, "the queue")?;
    progress.emit(Event::StepStarted {
        step: "load publish".into(),
        detail: format!(
            "{} messages of {} bytes into '{}'",
            spec.count, spec.size, spec.queue
        ),
    });
    let connection = amqp::connect_named(
        target,
        &format!("{LOAD_CONNECTION_PREFIX}publish {}", spec.queue),
    )
    .await?;
    let channel = amqp::open_channel(&connection, target).await?;
    channel
        .queue_declare(
            spec.queue.as_str().into(),
            QueueDeclareOptions {
                // Without --declare only check that it exists: a typo must not create a queue.
                passive: !spec.declare,
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|error| channel_error(target, &spec.queue, &error))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|error| connection_error(target, &error))?;
    let body = body(spec.size);
    let started = Instant::now();
    let mut pending = VecDeque::new();
    let mut confirmed = 0u64;
    let mut stopped_by = "count";
    for index in 0..spec.count {
        if cancel.is_cancelled() {
            stopped_by = "signal";
            break;
        }
        pace(spec.rate, started, index).await;
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or_default();
        let mut headers = FieldTable::default();
        headers.insert(
            "key".into(),
            AMQPValue::LongString(format!("key-{}", index % u64::from(spec.keys)).into()),
        );
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers)
            .with_message_id(format!("load-{index}").into())
            .with_timestamp(timestamp);
        let confirm = channel
            .basic_publish(
                "".into(),
                spec.queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await
            .map_err(|error| channel_error(target, &spec.queue, &error))?;
        pending.push_back(confirm);
        if pending.len() >= PUBLISH_WINDOW {
            confirmed += settle(&mut pending, PUBLISH_WINDOW / 2, target, &spec.queue).await?;
            progress.emit(progress_event(confirmed, pending.len(), started));
        }
    }
    let all = pending.len();
    confirmed += settle(&mut pending, all, target, &spec.queue).await?;
    let _ = connection.close(200, "load publish done".into()).await;
    progress.emit(Event::StepFinished {
        step: "load publish".into(),
    });
    Ok(outcome(&spec.queue, confirmed, started, stopped_by))
}

/// Waits for the oldest `count` confirms; a nack is an error (the broker refused the message).
async fn settle(
    pending: &mut VecDeque<lapin::PublisherConfirm>,
    count: usize,
    target: &RabbitTarget,
    queue: &str,
) -> Result<u64> {
    let mut acked = 0;
    for _ in 0..count {
        let Some(confirm) = pending.pop_front() else {
            break;
        };
        let confirmation = confirm
            .await
            .map_err(|error| channel_error(target, queue, &error))?;
        if !confirmation.is_ack() {
            return Err(Error::Broker(format!(
                "RabbitMQ refused (nacked) a message published to '{queue}': is it at its length limit with reject-publish?"
            )));
        }
        acked += 1;
    }
    Ok(acked)
}

pub async fn consume(
    target: &RabbitTarget,
    spec: &ConsumeSpec,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<LoadOutcome> {
    amqp::check_queue_name(&spec.queue, "the queue")?;
    progress.emit(Event::StepStarted {
        step: "load consume".into(),
        detail: format!("queue '{}'", spec.queue),
    });
    let connection = amqp::connect_named(
        target,
        &format!("{LOAD_CONNECTION_PREFIX}consume {}", spec.queue),
    )
    .await?;
    let channel = amqp::open_channel(&connection, target).await?;
    channel
        .basic_qos(spec.prefetch, BasicQosOptions::default())
        .await
        .map_err(|error| connection_error(target, &error))?;
    let mut consumer = channel
        .basic_consume(
            spec.queue.as_str().into(),
            "load-generator".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|error| channel_error(target, &spec.queue, &error))?;
    let started = Instant::now();
    let mut consumed = 0u64;
    let mut idle_since = Instant::now();
    let mut last_progress = Instant::now();
    let poll = Duration::from_millis(250);
    let stopped_by = loop {
        if spec.max.is_some_and(|max| consumed >= max) {
            break "max";
        }
        let next = tokio::select! {
            _ = cancel.cancelled() => break "signal",
            next = tokio::time::timeout(poll, consumer.next()) => next,
        };
        match next {
            Err(_) => {
                if spec.until_empty && idle_since.elapsed() >= spec.idle {
                    // Nothing arrived for a while; the queue must also say it is empty.
                    let counts = amqp::passive_declare(&connection, target, &spec.queue).await?;
                    if counts.ready == 0 {
                        break "empty";
                    }
                    idle_since = Instant::now();
                }
            }
            Ok(None) => {
                return Err(Error::Broker(format!(
                    "the broker cancelled the consumer on '{}' (was the queue deleted?)",
                    spec.queue
                )))
            }
            Ok(Some(Err(error))) => return Err(channel_error(target, &spec.queue, &error)),
            Ok(Some(Ok(delivery))) => {
                delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|error| channel_error(target, &spec.queue, &error))?;
                consumed += 1;
                idle_since = Instant::now();
                if last_progress.elapsed() >= Duration::from_millis(500) {
                    last_progress = Instant::now();
                    progress.emit(progress_event(consumed, 0, started));
                }
                pace(spec.rate, started, consumed).await;
            }
        }
    };
    // Closing the channel returns prefetched but unacked deliveries to the queue.
    let _ = channel.close(200, "load consume done".into()).await;
    let _ = connection.close(200, "load consume done".into()).await;
    progress.emit(Event::StepFinished {
        step: "load consume".into(),
    });
    Ok(outcome(&spec.queue, consumed, started, stopped_by))
}
