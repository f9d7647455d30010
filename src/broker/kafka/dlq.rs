//! Kafka dead-letter topics: reading one without moving any group's offsets (an assigned
//! consumer that never joins a group or commits), and the replay sink that produces each record
//! to `--to` or the parking-lot topic.
//!
//! Kafka has no dead-letter standard: the reason is read from a header (`--reason-header`), the
//! age from the record timestamp (when the dead-lettering producer wrote it).

use super::client::{self, blocking, request_error, REQUEST_TIMEOUT};
use super::forwarding::{retryable, KafkaSource};
use super::inspect::partition_ids;
use crate::broker::{Confirmation, Refusal, Route, Sink};
use crate::endpoint::KafkaTarget;
use crate::error::{Error, Result};
use crate::ops::dlq::{
    describe_rules, now_ms, parse_replays, DeadLetter, Destination, DlqInspectReport,
    DlqInspectSpec, DlqReplayOutcome, DlqReplaySpec, FilterField, ReplayRules, SkipCounts,
    PARKED_FROM_HEADER, REPLAYS_HEADER,
};
use crate::ops::forward_loop::{self, LoopSettings};
use crate::ops::inspect::Warning;
use crate::progress::{Event, Progress};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub const PEEK_METHOD: &str = "read with an assigned consumer that joins no group and commits nothing: no group's offsets moved";
/// Group id of the reading consumer; it never joins the group or commits under it.
const OBSERVER_GROUP: &str = "mqdrain-observer";
/// A read gives up when nothing at all arrived for this long.
const PEEK_STALL: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(200);
/// Dry runs read at most this many records unless `--max-messages` says otherwise.
const DRY_RUN_PEEK: u64 = 10_000;
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(10);
/// `client.id` of the replay's producer.
const REPLAY_CLIENT_ID: &str = "mqdrain-dlq-replay";

/// The dead-letter facts of one record.
pub fn dead_letter_of<M: Message>(message: &M, reason_header: &str) -> DeadLetter {
    let header = |name: &str| {
        message
            .headers()?
            .iter()
            .find(|header| header.key == name)
            .and_then(|header| header.value)
    };
    DeadLetter {
        reason: header(reason_header).map(|value| String::from_utf8_lossy(value).into_owned()),
        queue: None,
        routing_key: None,
        partition: Some(message.partition()),
        dead_at_ms: message.timestamp().to_millis(),
        replays: header(REPLAYS_HEADER).map_or(0, parse_replays),
    }
}

fn topic_label(name: &str) -> String {
    format!("topic '{name}'")
}

/// What one read saw.
struct Peeked {
    /// Records between the start offsets and the end when the read began.
    depth: u64,
    letters: Vec<DeadLetter>,
}

/// Reads up to `max` records of `topic`, from the oldest one or from where `group` committed
/// (what a replay under it would read next), up to the end as it was when the read began.
async fn peek(
    target: &KafkaTarget,
    topic: &str,
    max: u64,
    reason_header: &str,
    group: Option<&str>,
) -> Result<Peeked> {
    let mut config = client::base_config(target, "mqdrain-dlq-peek");
    config
        .set("group.id", group.unwrap_or(OBSERVER_GROUP))
        // Nothing is ever committed: the group's offsets are only read, never written.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("allow.auto.create.topics", "false");
    let consumer: BaseConsumer = config
        .create()
        .map_err(|error| client::client_setup_error(target, "DLQ reading consumer", &error))?;
    let consumer = Arc::new(consumer);
    let partitions = partition_ids(target, &consumer, topic).await?;
    let target = target.clone();
    let topic = topic.to_string();
    let reason_header = reason_header.to_string();
    let with_group = group.is_some();
    blocking(move || {
        let failed = |what: String, error: &KafkaError| request_error(&target, &what, error);
        let committed = if with_group {
            let mut list = TopicPartitionList::new();
            for &partition in &partitions {
                list.add_partition(&topic, partition);
            }
            Some(
                consumer
                    .committed_offsets(list, REQUEST_TIMEOUT)
                    .map_err(|error| {
                        failed(
                            format!("reading committed offsets on topic '{topic}'"),
                            &error,
                        )
                    })?,
            )
        } else {
            None
        };
        let mut assignment = TopicPartitionList::new();
        // Per partition, the end offset when the read began.
        let mut remaining: BTreeMap<i32, i64> = BTreeMap::new();
        let mut depth = 0u64;
        for &partition in &partitions {
            let (low, high) = consumer
                .fetch_watermarks(&topic, partition, REQUEST_TIMEOUT)
                .map_err(|error| {
                    failed(
                        format!("reading the watermarks of '{topic}' partition {partition}"),
                        &error,
                    )
                })?;
            let start = committed
                .as_ref()
                .and_then(|list| list.find_partition(&topic, partition))
                .and_then(|element| match element.offset() {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                })
                .unwrap_or(low)
                .max(low);
            if start < high {
                depth += u64::try_from(high - start).unwrap_or(0);
                remaining.insert(partition, high);
                assignment
                    .add_partition_offset(&topic, partition, Offset::Offset(start))
                    .map_err(|error| failed(format!("assigning '{topic}'"), &error))?;
            }
        }
        let mut letters = Vec::new();
        if remaining.is_empty() {
            return Ok(Peeked { depth, letters });
        }
        consumer
            .assign(&assignment)
            .map_err(|error| failed(format!("assigning '{topic}'"), &error))?;
        let mut last_event = Instant::now();
        while !remaining.is_empty()
            && (letters.len() as u64) < max
            && last_event.elapsed() < PEEK_STALL
        {
            match consumer.poll(POLL) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    last_event = Instant::now();
                    remaining.remove(&partition);
                }
                Some(Err(error)) if is_transient(&error) => {}
                Some(Err(error)) => {
                    return Err(failed(format!("reading topic '{topic}'"), &error));
                }
                Some(Ok(message)) => {
                    last_event = Instant::now();
                    let partition = message.partition();
                    let Some(&end) = remaining.get(&partition) else {
                        continue;
                    };
                    if message.offset() < end {
                        letters.push(dead_letter_of(&message, &reason_header));
                    }
                    if message.offset() + 1 >= end {
                        remaining.remove(&partition);
                    }
                }
            }
        }
        let _ = consumer.unassign();
        Ok(Peeked { depth, letters })
    })
    .await
}

fn is_transient(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::NetworkException
        )
    )
}

pub async fn inspect(
    target: &KafkaTarget,
    spec: &DlqInspectSpec,
    progress: &Progress,
) -> Result<DlqInspectReport> {
    progress.emit(Event::StepStarted {
        step: "dlq-inspect".into(),
        detail: format!(
            "topic '{}' on kafka://{}",
            spec.name, target.bootstrap_servers
        ),
    });
    let peeked = peek(
        target,
        &spec.name,
        spec.max_messages,
        &spec.reason_header,
        None,
    )
    .await?;
    let now = now_ms();
    let mut report = DlqInspectReport::new("kafka", &spec.name, PEEK_METHOD.to_string());
    report.depth = Some(peeked.depth);
    for letter in &peeked.letters {
        report.add(letter, now);
    }
    report.complete = report.examined >= peeked.depth;
    if !report.complete {
        report.warnings.push(Warning {
            code: "partial",
            message: format!(
                "examined {} of the {} records: raise --max-messages to count them all",
                report.examined, peeked.depth
            ),
        });
    }
    if report.examined > 0 && peeked.letters.iter().all(|letter| letter.reason.is_none()) {
        report.warnings.push(Warning {
            code: "no-reason-header",
            message: format!(
                "none of the records carries header '{}': give the header your dead-lettering producer writes with --reason-header (Kafka Connect: __connect.errors.exception.class.name; Spring: kafka_dlt-exception-fqcn)",
                spec.reason_header
            ),
        });
    }
    progress.emit(Event::StepFinished {
        step: "dlq-inspect".into(),
    });
    Ok(report)
}

/// The replay's targets: `--to`, then the parking-lot topic if there is one.
pub struct ReplaySink {
    producer: FutureProducer,
    topics: Vec<String>,
    dlq: String,
    reason_header: String,
    rules: ReplayRules,
    skips: Arc<SkipCounts>,
    bootstrap: String,
}

impl ReplaySink {
    fn new(
        target: &KafkaTarget,
        spec: &DlqReplaySpec,
        rules: ReplayRules,
        skips: Arc<SkipCounts>,
    ) -> Result<Self> {
        let producer = client::confirming_producer(
            target,
            REPLAY_CLIENT_ID,
            "replay",
            // Same key, same partition as the Java producers that usually own the topic.
            &[("partitioner", "murmur2_random")],
        )?;
        Ok(ReplaySink {
            producer,
            topics: std::iter::once(spec.to.clone())
                .chain(spec.parking_lot.clone())
                .collect(),
            dlq: spec.name.clone(),
            reason_header: spec.reason_header.clone(),
            rules,
            skips,
            bootstrap: target.bootstrap_servers.clone(),
        })
    }
}

/// The record's headers with mqdrain's bookkeeping updated: the counter (replay) or where it
/// was parked from; every other header is copied in order.
fn replay_headers(message: &OwnedMessage, index: usize) -> OwnedHeaders {
    let replaced = if index == Destination::REPLAY_TARGET {
        REPLAYS_HEADER
    } else {
        PARKED_FROM_HEADER
    };
    let mut headers = OwnedHeaders::new();
    let mut replays = 0;
    if let Some(existing) = message.headers() {
        for header in existing.iter() {
            if header.key == REPLAYS_HEADER {
                replays = header.value.map_or(0, parse_replays);
            }
            if header.key != replaced {
                headers = headers.insert(header);
            }
        }
    }
    if index == Destination::REPLAY_TARGET {
        let value = replays.saturating_add(1).to_string();
        headers.insert(Header {
            key: REPLAYS_HEADER,
            value: Some(value.as_str()),
        })
    } else {
        headers.insert(Header {
            key: PARKED_FROM_HEADER,
            value: Some(message.topic()),
        })
    }
}

impl Sink for ReplaySink {
    type Message = OwnedMessage;

    fn fanout(&self) -> usize {
        self.topics.len()
    }

    fn target_name(&self, _lane: u32, index: usize) -> String {
        topic_label(self.topics.get(index).map_or("?", String::as_str))
    }

    fn route(&self, _lane: u32, message: &OwnedMessage) -> Route {
        match self
            .rules
            .destination(&dead_letter_of(message, &self.reason_header))
        {
            Destination::Replay => Route::Target(Destination::REPLAY_TARGET),
            Destination::Park => Route::Target(Destination::PARKING_TARGET),
            skipped => {
                self.skips.record(skipped);
                Route::Skip
            }
        }
    }

    async fn send(
        &mut self,
        _lane: u32,
        index: usize,
        message: &OwnedMessage,
    ) -> Result<Confirmation> {
        let topic = self.topics.get(index).ok_or_else(|| {
            Error::Broker(format!(
                "dlq replay has no target {index} (no --parking-lot was given); this is a bug in mqdrain"
            ))
        })?;
        // No partition and no timestamp: the key decides the partition (murmur2), and a new
        // timestamp keeps the target's time-based retention from deleting an old record at once.
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).headers(replay_headers(message, index));
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        let delivery = loop {
            match self.producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                }
                Err((error, _)) => {
                    return Err(Error::Broker(format!(
                        "cannot hand a record from '{}' to the producer for topic '{topic}' on {}: {error}; check the topic and the -X settings, then run dlq replay again",
                        self.dlq, self.bootstrap
                    )))
                }
            }
        };
        Ok(Box::pin(async move {
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((error, _))) => Err(if retryable(&error) {
                    Refusal::retry(error.to_string())
                } else {
                    Refusal::fatal(error.to_string())
                }),
                Err(_) => Err(Refusal::fatal(
                    "the producer shut down before the broker confirmed",
                )),
            }
        }))
    }

    async fn close(self) -> Result<()> {
        let producer = self.producer;
        let topics = self.topics.join("', '");
        let bootstrap = self.bootstrap;
        blocking(move || {
            producer.flush(FLUSH_TIMEOUT).map_err(|error| {
                Error::Broker(format!(
                    "the producer could not deliver every record to '{topics}' on {bootstrap} within {}: {error}; unconfirmed records were not committed on the dead-letter topic and will be replayed again",
                    humantime::format_duration(FLUSH_TIMEOUT)
                ))
            })
        })
        .await
    }
}

/// A replay target must exist: the producer would otherwise wait for it until the timeout.
async fn require_topic(target: &KafkaTarget, name: &str, option: &str) -> Result<()> {
    let observer = Arc::new(client::observer(target, OBSERVER_GROUP)?);
    match partition_ids(target, &observer, name).await {
        Err(Error::NotFound { kind, name, scope, .. }) => Err(Error::NotFound {
            kind,
            name,
            scope,
            hint: format!(
                "{option} names the topic records are produced to; create it or fix the name, then run dlq replay again"
            ),
        }),
        other => other.map(|_| ()),
    }
}

pub async fn replay(
    target: &KafkaTarget,
    spec: &DlqReplaySpec,
    rules: ReplayRules,
    dry_run: bool,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<DlqReplayOutcome> {
    if let Some(filter) = rules
        .filters
        .iter()
        .find(|filter| filter.field != FilterField::Reason)
    {
        return Err(Error::usage(format!(
            "--filter {}=... is RabbitMQ only (it comes from x-death); on Kafka filter by reason=..., read from header '{}' (--reason-header)",
            filter.field.name(), spec.reason_header
        )));
    }
    let group = match spec.group.as_deref() {
        Some(group) if !group.trim().is_empty() => group,
        _ => {
            return Err(Error::usage(format!(
                "dlq replay on Kafka needs --group: the consumer group the replay commits under on topic '{}' (e.g. {}-replay); a rerun under the same group continues where the last one stopped",
                spec.name, spec.name
            )))
        }
    };
    progress.emit(Event::StepStarted {
        step: "dlq-replay".into(),
        detail: format!(
            "topic '{}' as group '{group}' to topic '{}' on kafka://{}",
            spec.name, spec.to, target.bootstrap_servers
        ),
    });
    let outcome = replay_with(target, spec, rules, group, dry_run, progress, cancel).await;
    progress.emit(Event::StepFinished {
        step: "dlq-replay".into(),
    });
    outcome
}

async fn replay_with(
    target: &KafkaTarget,
    spec: &DlqReplaySpec,
    rules: ReplayRules,
    group: &str,
    dry_run: bool,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<DlqReplayOutcome> {
    let observer = Arc::new(client::observer(target, group)?);
    partition_ids(target, &observer, &spec.name).await?;
    require_topic(target, &spec.to, "--to").await?;
    if let Some(parking) = &spec.parking_lot {
        require_topic(target, parking, "--parking-lot").await?;
    }
    let mut outcome = DlqReplayOutcome::new(spec, dry_run);
    let to = topic_label(&spec.to);
    let parking = spec.parking_lot.as_deref().map(topic_label);
    let rules_line = describe_rules(spec, &to, parking.as_deref());
    outcome.describe_dedup(spec, "<topic>-<partition>-<offset>");

    if dry_run {
        let peeked = peek(
            target,
            &spec.name,
            spec.max_messages.unwrap_or(DRY_RUN_PEEK),
            &spec.reason_header,
            Some(group),
        )
        .await?;
        let read = format!(
            "read {} of the {} records of topic '{}' after group '{group}''s committed offsets, committing nothing; nothing was moved",
            peeked.letters.len(),
            peeked.depth,
            spec.name
        );
        outcome.plan_dry_run(
            peeked
                .letters
                .iter()
                .map(|letter| rules.destination(letter)),
            peeked.depth,
            read,
            &rules_line,
            "records",
            "raise --max-messages",
        );
        return Ok(outcome);
    }

    // Before consuming: an unreachable Redis stops the replay with nothing taken.
    let dedup = spec
        .open_dedup(&["kafka-replay", &spec.name, group], progress)
        .await?;
    let skips = Arc::new(SkipCounts::default());
    let sink = ReplaySink::new(target, spec, rules, skips.clone())?;
    // Joining the group takes seconds: a stop signal ends it (nothing was consumed yet).
    let source = tokio::select! {
        joined = KafkaSource::start(target, &spec.name, group) => joined?,
        _ = cancel.cancelled() => return Err(Error::Cancelled),
    };
    outcome.actions.push(format!(
        "consumed topic '{}' as group '{group}' from its committed offsets, produced with an idempotent producer (acks=all) and committed only delivered records",
        spec.name
    ));
    outcome.actions.push(rules_line);
    let result = forward_loop::run(
        source,
        sink,
        &LoopSettings::for_replay(spec, dedup),
        progress,
        cancel,
    )
    .await?;
    outcome.replayed = result.per_target.get(&to).copied().unwrap_or(0);
    outcome.parked = parking
        .as_ref()
        .and_then(|parking| result.per_target.get(parking).copied())
        .unwrap_or(0);
    outcome.skipped_by_filter = skips.filtered();
    outcome.kept_at_budget = skips.kept_at_budget();
    let left = outcome.skipped_by_filter + outcome.kept_at_budget;
    if left > 0 {
        outcome.warnings.push(Warning {
            code: "skipped-records",
            message: format!(
                "{left} skipped record(s) stay in topic '{}' (Kafka deletes nothing on consume), but group '{group}''s offsets move past them once a later record of their partition is replayed: a later replay under the same group does not see them again; use a new --group to replay them",
                spec.name
            ),
        });
    }
    outcome.result = Some(result);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Timestamp;

    fn record(headers: OwnedHeaders) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"payload".to_vec()),
            Some(b"key".to_vec()),
            "orders.dlq".to_string(),
            Timestamp::CreateTime(1_700_000_000_000),
            3,
            41,
            Some(headers),
        )
    }

    fn headers(pairs: &[(&str, &str)]) -> OwnedHeaders {
        pairs
            .iter()
            .fold(OwnedHeaders::new(), |headers, (key, value)| {
                headers.insert(Header {
                    key,
                    value: Some(*value),
                })
            })
    }

    fn pairs(headers: &OwnedHeaders) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|header| {
                (
                    header.key.to_string(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn reason_partition_time_and_counter_come_from_the_record() {
        let message = record(headers(&[("why", "poison"), (REPLAYS_HEADER, "2")]));
        let letter = dead_letter_of(&message, "why");
        assert_eq!(letter.reason.as_deref(), Some("poison"));
        assert_eq!(letter.partition, Some(3));
        assert_eq!(letter.dead_at_ms, Some(1_700_000_000_000));
        assert_eq!(letter.replays, 2);
        assert_eq!(dead_letter_of(&message, "other").reason, None);
    }

    #[test]
    fn replay_increments_the_counter_and_parking_records_the_origin() {
        let message = record(headers(&[
            ("why", "poison"),
            (REPLAYS_HEADER, "2"),
            ("a", "b"),
        ]));
        assert_eq!(
            pairs(&replay_headers(&message, Destination::REPLAY_TARGET)),
            vec![
                ("why".to_string(), "poison".to_string()),
                ("a".to_string(), "b".to_string()),
                (REPLAYS_HEADER.to_string(), "3".to_string()),
            ]
        );
        assert_eq!(
            pairs(&replay_headers(&message, Destination::PARKING_TARGET)),
            vec![
                ("why".to_string(), "poison".to_string()),
                (REPLAYS_HEADER.to_string(), "2".to_string()),
                ("a".to_string(), "b".to_string()),
                (PARKED_FROM_HEADER.to_string(), "orders.dlq".to_string()),
            ]
        );
    }
}
