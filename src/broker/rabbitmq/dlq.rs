//! RabbitMQ dead-letter queues: what `x-death` says about a message, reading a DLQ without
//! consuming it (consume with manual ack, never ack, close the channel: everything is requeued),
//! and the replay sink that routes each message to `--to` or the parking lot.

use super::amqp::{self, channel_error, connection_error};
use super::forwarding::{publish_confirmed, QueueSource};
use super::management::Management;
use crate::broker::{Confirmation, Route, Sink};
use crate::endpoint::RabbitTarget;
use crate::error::{Error, Result};
use crate::ops::dlq::{
    describe_rules, now_ms, parse_replays, DeadLetter, Destination, DlqInspectReport,
    DlqInspectSpec, DlqReplayOutcome, DlqReplaySpec, ReplayRules, SkipCounts, MAX_RABBIT_PEEK,
    PARKED_FROM_HEADER, REPLAYS_HEADER, REPLAY_ACK_BATCH,
};
use crate::ops::forward_loop::{self, LoopSettings};
use crate::ops::inspect::Warning;
use crate::progress::{Event, Level, Progress};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How the messages were read, for the report and `--help`.
pub const PEEK_METHOD: &str = "consumed with manual acknowledgement and never acknowledged; closing the channel requeued every message (redelivered flag set, order kept on classic queues)";
/// A peek ends when no further message arrived for this long (other consumers took the rest).
const PEEK_QUIET: Duration = Duration::from_secs(2);
/// Dry runs read at most this many messages unless `--max-messages` says otherwise.
const DRY_RUN_PEEK: u64 = 10_000;

/// The dead-letter facts of one delivery: the latest `x-death` entry says why it is here now,
/// `x-first-death-queue` where it came from, and that death's entry the routing key it was
/// first published with.
pub fn dead_letter_of(delivery: &Delivery) -> DeadLetter {
    let empty = FieldTable::default();
    let headers = delivery.properties.headers().as_ref().unwrap_or(&empty);
    let get = |name: &str| headers.inner().get(name);
    // Newest first; RabbitMQ moves an entry to the front when the same queue/reason repeats.
    let deaths: Vec<&FieldTable> = match get("x-death") {
        Some(AMQPValue::FieldArray(entries)) => entries
            .as_slice()
            .iter()
            .filter_map(|entry| match entry {
                AMQPValue::FieldTable(table) => Some(table),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let field = |table: &FieldTable, name: &str| table.inner().get(name).and_then(text);
    let latest = deaths.first();
    let reason = get("x-last-death-reason")
        .and_then(text)
        .or_else(|| latest.and_then(|entry| field(entry, "reason")))
        .or_else(|| get("x-first-death-reason").and_then(text));
    let first_queue = get("x-first-death-queue")
        .and_then(text)
        .or_else(|| deaths.last().and_then(|entry| field(entry, "queue")));
    let first_reason = get("x-first-death-reason").and_then(text);
    let first_entry = deaths
        .iter()
        .find(|entry| {
            field(entry, "queue") == first_queue
                && (first_reason.is_none() || field(entry, "reason") == first_reason)
        })
        .or(deaths.last());
    let routing_key = first_entry.and_then(|entry| match entry.inner().get("routing-keys") {
        Some(AMQPValue::FieldArray(keys)) => keys.as_slice().first().and_then(text),
        _ => None,
    });
    let died_at_secs = latest
        .and_then(|entry| entry.inner().get("time"))
        .and_then(|time| match time {
            AMQPValue::Timestamp(secs) => Some(*secs),
            other => integer(other),
        })
        // Not dead-lettered by RabbitMQ (published into the DLQ directly): its own timestamp.
        .or(*delivery.properties.timestamp());
    DeadLetter {
        reason,
        queue: first_queue,
        routing_key,
        partition: None,
        dead_at_ms: died_at_secs.and_then(|secs| i64::try_from(secs.saturating_mul(1000)).ok()),
        replays: replays_of(headers),
    }
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(text) => Some(text.to_string()),
        AMQPValue::ShortString(text) => Some(text.to_string()),
        _ => None,
    }
}

fn integer(value: &AMQPValue) -> Option<u64> {
    let signed: i64 = match value {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::Timestamp(v) => return Some(*v),
        _ => return None,
    };
    u64::try_from(signed).ok()
}

/// `x-mqdrain-replays`, whichever integer type (or text) a client wrote it with.
fn replays_of(headers: &FieldTable) -> u64 {
    match headers.inner().get(REPLAYS_HEADER) {
        Some(AMQPValue::LongString(value)) => parse_replays(value.as_bytes()),
        Some(AMQPValue::ShortString(value)) => parse_replays(value.as_str().as_bytes()),
        Some(other) => integer(other).unwrap_or(0),
        None => 0,
    }
}

/// What one peek saw.
struct Peeked {
    /// Ready messages when the peek began.
    ready: u64,
    consumers: u64,
    letters: Vec<DeadLetter>,
}

/// Reads up to `max` messages of `queue` and returns all of them to it: consume with manual
/// ack and a prefetch of `max`, never ack, close the channel. Nothing is removed even if mqdrain
/// dies half-way (the broker requeues a dead connection's unacked messages).
async fn peek(
    connection: &Connection,
    target: &RabbitTarget,
    queue: &str,
    max: u64,
) -> Result<Peeked> {
    let counts = amqp::passive_declare(connection, target, queue).await?;
    let wanted = counts.ready.min(max);
    let mut peeked = Peeked {
        ready: counts.ready,
        consumers: counts.consumers,
        letters: Vec::new(),
    };
    if wanted == 0 {
        return Ok(peeked);
    }
    let channel = amqp::open_channel(connection, target).await?;
    let read = read_unacked(&channel, target, queue, wanted, &mut peeked.letters).await;
    // Closing the channel requeues every delivery it holds: that is what makes this a peek.
    let _ = channel.close(200, "mqdrain dlq peek done".into()).await;
    read.map(|()| peeked)
}

async fn read_unacked(
    channel: &Channel,
    target: &RabbitTarget,
    queue: &str,
    wanted: u64,
    letters: &mut Vec<DeadLetter>,
) -> Result<()> {
    // `wanted` is at most MAX_RABBIT_PEEK, checked by the callers.
    let prefetch = u16::try_from(wanted).unwrap_or(u16::MAX);
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|error| connection_error(target, &error))?;
    let tag = format!("mqdrain-dlq-peek-{}", std::process::id());
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|error| channel_error(target, queue, &error))?;
    while (letters.len() as u64) < wanted {
        match tokio::time::timeout(PEEK_QUIET, consumer.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(Ok(delivery))) => letters.push(dead_letter_of(&delivery)),
            Ok(Some(Err(error))) => return Err(channel_error(target, queue, &error)),
        }
    }
    // Stop deliveries before the close, so nothing new arrives while the channel goes away.
    let _ = channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    Ok(())
}

/// The queue's type from the management API, best effort: a DLQ can be read without it.
async fn queue_type(target: &RabbitTarget, queue: &str) -> Option<String> {
    let api = Management::new(&target.management, target.ca_file.as_deref()).ok()?;
    api.queue(&target.vhost, queue).await.ok()??.queue_type
}

/// Refuses streams; warns about what reading and returning messages does on a quorum queue.
fn type_warnings(queue: &str, queue_type: Option<&str>) -> Result<Vec<Warning>> {
    match queue_type {
        Some("stream") => Err(Error::usage(format!(
            "'{queue}' is a stream: streams keep their messages and are read by offset, so they hold no dead letters to requeue; read it with a stream client"
        ))),
        Some("quorum") => Ok(vec![Warning {
            code: "quorum-delivery-count",
            message: format!(
                "'{queue}' is a quorum queue: every message mqdrain reads and returns counts as a delivery attempt (x-delivery-count); with a delivery limit (RabbitMQ 4.x sets 20 by default) a message read that often is dead-lettered or dropped"
            ),
        }]),
        _ => Ok(Vec::new()),
    }
}

fn consumer_warning(queue: &str, consumers: u64) -> Option<Warning> {
    (consumers > 0).then(|| Warning {
        code: "dlq-consumers",
        message: format!(
            "'{queue}' has {consumers} consumer(s): they may take messages while mqdrain reads, and get the read ones back with the redelivered flag"
        ),
    })
}

fn check_peek_limit(max: u64) -> Result<()> {
    if max > MAX_RABBIT_PEEK {
        return Err(Error::usage(format!(
            "--max-messages {max} is too many to read without consuming on RabbitMQ: every message read stays unacknowledged until the end, and AMQP's prefetch stops at {MAX_RABBIT_PEEK}; give at most {MAX_RABBIT_PEEK}"
        )));
    }
    Ok(())
}

pub async fn inspect(
    target: &RabbitTarget,
    spec: &DlqInspectSpec,
    progress: &Progress,
) -> Result<DlqInspectReport> {
    check_peek_limit(spec.max_messages)?;
    amqp::check_queue_name(&spec.name, "the dead-letter queue")?;
    progress.emit(Event::StepStarted {
        step: "dlq-inspect".into(),
        detail: format!("queue '{}' in vhost '{}'", spec.name, target.vhost),
    });
    let mut warnings = type_warnings(&spec.name, queue_type(target, &spec.name).await.as_deref())?;
    let connection = amqp::connect(target, &format!("dlq-inspect {}", spec.name)).await?;
    let peeked = peek(&connection, target, &spec.name, spec.max_messages).await;
    let _ = connection
        .close(200, "mqdrain dlq inspect done".into())
        .await;
    let peeked = peeked?;
    let now = now_ms();
    let mut report = DlqInspectReport::new("rabbitmq", &spec.name, PEEK_METHOD.to_string());
    report.depth = Some(peeked.ready);
    for letter in &peeked.letters {
        report.add(letter, now);
    }
    report.complete = report.examined >= peeked.ready;
    warnings.extend(consumer_warning(&spec.name, peeked.consumers));
    if !report.complete {
        warnings.push(Warning {
            code: "partial",
            message: format!(
                "examined {} of the {} messages: the counts cover the oldest {} only; raise --max-messages (at most {MAX_RABBIT_PEEK})",
                report.examined, peeked.ready, report.examined
            ),
        });
    }
    report.warnings = warnings;
    progress.emit(Event::StepFinished {
        step: "dlq-inspect".into(),
    });
    Ok(report)
}

/// The replay's targets: `--to`, then the parking lot if there is one.
pub struct ReplaySink {
    channel: Channel,
    queues: Vec<String>,
    dlq: String,
    rules: ReplayRules,
    skips: Arc<SkipCounts>,
    target: RabbitTarget,
}

impl ReplaySink {
    async fn open(
        connection: &Connection,
        target: &RabbitTarget,
        spec: &DlqReplaySpec,
        rules: ReplayRules,
        skips: Arc<SkipCounts>,
    ) -> Result<Self> {
        let channel = amqp::open_channel(connection, target).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|error| connection_error(target, &error))?;
        Ok(ReplaySink {
            channel,
            queues: std::iter::once(spec.to.clone())
                .chain(spec.parking_lot.clone())
                .collect(),
            dlq: spec.name.clone(),
            rules,
            skips,
            target: target.clone(),
        })
    }
}

impl Sink for ReplaySink {
    type Message = Delivery;

    fn fanout(&self) -> usize {
        self.queues.len()
    }

    fn target_name(&self, _lane: u32, index: usize) -> String {
        queue_label(self.queues.get(index).map_or("?", String::as_str))
    }

    fn route(&self, _lane: u32, message: &Delivery) -> Route {
        match self.rules.destination(&dead_letter_of(message)) {
            Destination::Replay => Route::Target(Destination::REPLAY_TARGET),
            Destination::Park => Route::Target(Destination::PARKING_TARGET),
            skipped => {
                self.skips.record(skipped);
                Route::Skip
            }
        }
    }

    async fn send(&mut self, _lane: u32, index: usize, message: &Delivery) -> Result<Confirmation> {
        let queue = self.queues.get(index).ok_or_else(|| {
            Error::Broker(format!(
                "dlq replay has no target {index} (no --parking-lot was given); this is a bug in mqdrain"
            ))
        })?;
        let mut headers = message.properties.headers().clone().unwrap_or_default();
        if index == Destination::REPLAY_TARGET {
            let replays = replays_of(&headers).saturating_add(1);
            headers.insert(
                ShortString::from(REPLAYS_HEADER),
                AMQPValue::LongLongInt(i64::try_from(replays).unwrap_or(i64::MAX)),
            );
        } else {
            headers.insert(
                ShortString::from(PARKED_FROM_HEADER),
                AMQPValue::LongString(self.dlq.as_str().into()),
            );
        }
        // Every other property (delivery mode, ids, type, timestamp, ...) goes out unchanged.
        let properties = message.properties.clone().with_headers(headers);
        publish_confirmed(
            &self.channel,
            &self.target,
            queue,
            &message.data,
            properties,
        )
    }

    async fn close(self) -> Result<()> {
        let _ = self
            .channel
            .close(200, "mqdrain dlq replay done".into())
            .await;
        Ok(())
    }
}

fn queue_label(name: &str) -> String {
    format!("queue '{name}'")
}

/// A replay target must exist: publishing to a missing queue through the default exchange
/// would only come back as unroutable.
async fn require_queue(
    connection: &Connection,
    target: &RabbitTarget,
    name: &str,
    option: &str,
) -> Result<()> {
    amqp::check_queue_name(name, option)?;
    match amqp::passive_declare(connection, target, name).await {
        Err(Error::NotFound { kind, name, scope, .. }) => Err(Error::NotFound {
            kind,
            name,
            scope,
            hint: format!(
                "{option} names the queue messages are published to (through the default exchange); create it (durable) or fix the name, then run dlq replay again"
            ),
        }),
        other => other.map(|_| ()),
    }
}

pub async fn replay(
    target: &RabbitTarget,
    spec: &DlqReplaySpec,
    rules: ReplayRules,
    dry_run: bool,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<DlqReplayOutcome> {
    if spec.confirm_window + REPLAY_ACK_BATCH > usize::from(spec.prefetch) {
        return Err(Error::usage(format!(
            "--confirm-window {} plus the acknowledgement batch {REPLAY_ACK_BATCH} exceeds --prefetch {}: the replay would wait for deliveries the broker holds back until it acks. Raise --prefetch or lower --confirm-window",
            spec.confirm_window, spec.prefetch
        )));
    }
    amqp::check_queue_name(&spec.name, "the dead-letter queue")?;
    let peek_limit = spec.max_messages.unwrap_or(DRY_RUN_PEEK);
    if dry_run {
        check_peek_limit(peek_limit)?;
    }
    progress.emit(Event::StepStarted {
        step: "dlq-replay".into(),
        detail: format!("queue '{}' to queue '{}'", spec.name, spec.to),
    });
    let connection = amqp::connect(target, &format!("dlq-replay {}", spec.name)).await?;
    let outcome = replay_on(
        &connection,
        target,
        spec,
        rules,
        dry_run,
        peek_limit,
        progress,
        cancel,
    )
    .await;
    let _ = connection
        .close(200, "mqdrain dlq replay done".into())
        .await;
    progress.emit(Event::StepFinished {
        step: "dlq-replay".into(),
    });
    outcome
}

// The steps of one replay share the connection; the arguments are what the caller checked.
#[allow(clippy::too_many_arguments)]
async fn replay_on(
    connection: &Connection,
    target: &RabbitTarget,
    spec: &DlqReplaySpec,
    rules: ReplayRules,
    dry_run: bool,
    peek_limit: u64,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<DlqReplayOutcome> {
    let dlq = amqp::passive_declare(connection, target, &spec.name).await?;
    require_queue(connection, target, &spec.to, "--to").await?;
    if let Some(parking) = &spec.parking_lot {
        require_queue(connection, target, parking, "--parking-lot").await?;
    }
    let mut outcome = DlqReplayOutcome::new(spec, dry_run);
    outcome.warnings = type_warnings(&spec.name, queue_type(target, &spec.name).await.as_deref())?;
    outcome
        .warnings
        .extend(consumer_warning(&spec.name, dlq.consumers));
    let to = queue_label(&spec.to);
    let parking = spec.parking_lot.as_deref().map(queue_label);
    let rules_line = describe_rules(spec, &to, parking.as_deref());
    outcome.describe_dedup(spec, "the message-id property");

    if dry_run {
        let peeked = peek(connection, target, &spec.name, peek_limit).await?;
        let read = format!(
            "read {} of the {} messages in queue '{}' without consuming them (never acknowledged, requeued when the channel closed); nothing was moved",
            peeked.letters.len(),
            peeked.ready,
            spec.name
        );
        outcome.plan_dry_run(
            peeked
                .letters
                .iter()
                .map(|letter| rules.destination(letter)),
            peeked.ready,
            read,
            &rules_line,
            "messages",
            &format!("raise --max-messages (at most {MAX_RABBIT_PEEK})"),
        );
        return Ok(outcome);
    }

    // Before consuming: an unreachable Redis stops the replay with nothing taken.
    let dedup = spec
        .open_dedup(&["amqp-replay", &target.vhost, &spec.name], progress)
        .await?;
    let source = QueueSource::open_tagged(
        connection,
        target,
        &spec.name,
        spec.prefetch,
        "mqdrain-dlq-replay",
    )
    .await?;
    let skips = Arc::new(SkipCounts::default());
    let sink = ReplaySink::open(connection, target, spec, rules, skips.clone()).await?;
    outcome.actions.push(format!(
        "consumed queue '{}' ({} ready) with prefetch {}, published with confirms and acked each message only after its confirm",
        spec.name, dlq.ready, spec.prefetch
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
        outcome.actions.push(format!(
            "left {left} in queue '{}': held unacknowledged during the replay and requeued when it ended",
            spec.name
        ));
    }
    if left >= u64::from(spec.prefetch) {
        // Held messages occupy the prefetch; once it is full the broker sends nothing more.
        progress.emit(Event::Notice {
            level: Level::Warn,
            message: format!("the {left} messages left in the DLQ filled the prefetch"),
        });
        outcome.warnings.push(Warning {
            code: "prefetch-full",
            message: format!(
                "the {left} messages left in queue '{}' filled the prefetch of {}, so the replay saw no more; rerun with a larger --prefetch (at most 65535), or handle those first",
                spec.name, spec.prefetch
            ),
        });
    }
    outcome.result = Some(result);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;
    use lapin::BasicProperties;

    fn delivery(headers: FieldTable, timestamp: Option<u64>) -> Delivery {
        let mut properties = BasicProperties::default().with_headers(headers);
        if let Some(timestamp) = timestamp {
            properties = properties.with_timestamp(timestamp);
        }
        let mut delivery = Delivery::mock(7, "dlx".into(), "orders".into(), false, Vec::new());
        delivery.properties = properties;
        delivery
    }

    fn death(queue: &str, reason: &str, key: &str, time: u64) -> AMQPValue {
        let mut entry = FieldTable::default();
        entry.insert("queue".into(), AMQPValue::LongString(queue.into()));
        entry.insert("reason".into(), AMQPValue::LongString(reason.into()));
        entry.insert("count".into(), AMQPValue::LongLongInt(1));
        entry.insert("time".into(), AMQPValue::Timestamp(time));
        entry.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(key.into())])),
        );
        AMQPValue::FieldTable(entry)
    }

    #[test]
    fn x_death_gives_the_latest_reason_and_the_first_queue_and_key() {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                death("retry", "rejected", "retry-key", 2_000),
                death("orders", "expired", "order.created", 1_000),
            ])),
        );
        headers.insert(
            "x-first-death-queue".into(),
            AMQPValue::LongString("orders".into()),
        );
        headers.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString("expired".into()),
        );
        headers.insert(REPLAYS_HEADER.into(), AMQPValue::LongInt(2));
        let letter = dead_letter_of(&delivery(headers, Some(5)));
        assert_eq!(letter.reason.as_deref(), Some("rejected"));
        assert_eq!(letter.queue.as_deref(), Some("orders"));
        assert_eq!(letter.routing_key.as_deref(), Some("order.created"));
        assert_eq!(
            letter.dead_at_ms,
            Some(2_000_000),
            "latest death, not the timestamp"
        );
        assert_eq!(letter.replays, 2);
    }

    #[test]
    fn without_x_death_only_the_timestamp_and_counter_are_known() {
        let mut headers = FieldTable::default();
        headers.insert(REPLAYS_HEADER.into(), AMQPValue::LongString("3".into()));
        let letter = dead_letter_of(&delivery(headers, Some(1_700_000_000)));
        assert_eq!(letter.reason, None);
        assert_eq!(letter.queue, None);
        assert_eq!(letter.dead_at_ms, Some(1_700_000_000_000));
        assert_eq!(letter.replays, 3);
        let letter = dead_letter_of(&delivery(FieldTable::default(), None));
        assert_eq!(letter, DeadLetter::default());
    }

    #[test]
    fn quorum_queues_warn_and_streams_are_refused() {
        assert!(type_warnings("q", Some("classic")).unwrap().is_empty());
        assert!(type_warnings("q", None).unwrap().is_empty());
        assert_eq!(
            type_warnings("q", Some("quorum")).unwrap()[0].code,
            "quorum-delivery-count"
        );
        assert!(matches!(
            type_warnings("q", Some("stream")),
            Err(Error::Usage { .. })
        ));
    }
}
