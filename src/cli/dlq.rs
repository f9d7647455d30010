//! Command-line types of `mqdrain dlq inspect` and `mqdrain dlq replay`, converted into the
//! core's `DlqInspectSpec` / `DlqReplaySpec`.

use crate::cli::{parse_duration, DryRun};
use crate::ops::dlq::{DlqInspectSpec, DlqReplaySpec, DEFAULT_REASON_HEADER};
use clap::{Args, Subcommand};
use std::time::Duration;

const DLQ_HELP: &str = "\
Reading without consuming. RabbitMQ has no way to browse a queue, so mqdrain consumes with
manual acknowledgement and a prefetch of --max-messages (at most 65535), never acknowledges, and
then closes its channel: the broker puts every message back. They are redelivered later with the
redelivered flag set; a classic queue keeps their order. On a quorum queue each read counts as a
delivery attempt (x-delivery-count), which matters under a delivery limit (RabbitMQ 4.x: 20 by
default). Kafka: an assigned consumer that joins no group and commits nothing.

The retry budget. x-death counts stop incrementing from RabbitMQ 3.13, so replay keeps its own
counter in the header x-mqdrain-replays (Kafka: a record header, decimal text). A message whose
counter reached --max-retries goes to --parking-lot instead (with x-mqdrain-parked-from), or
stays in the DLQ when no parking lot is given.

Examples:
  mqdrain --url amqp://guest:guest@localhost:5672/%2f dlq inspect orders.dlq
  mqdrain --url amqp://... dlq replay orders.dlq --to orders --parking-lot orders.parked --dry-run
  mqdrain --url amqp://... dlq replay orders.dlq --to orders --filter reason=expired,maxlen
  mqdrain --url kafka://localhost:9092 dlq replay orders.dlq --to orders --group orders-dlq-replay";

/// Dead-letter queues: count what died and why, replay it under a retry budget.
#[derive(Debug, Args)]
#[command(after_help = DLQ_HELP)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Count a DLQ's messages by reason, original queue and routing key, with an age histogram;
    /// reads without consuming (every message stays).
    ///
    /// RabbitMQ: from x-death (the latest death's reason and time) and x-first-death-queue: why
    /// each message is here (rejected, expired, maxlen, delivery_limit), where it first died,
    /// the routing key it was published with, how long ago. Kafka: by the reason header
    /// (--reason-header), by partition, and the age from the record timestamps.
    #[command(after_help = DLQ_HELP)]
    Inspect(DlqInspectArgs),

    /// Republish dead letters to a queue or topic with confirms, acking each only after its
    /// confirm; park those at the retry budget.
    ///
    /// Each message keeps its properties and headers; x-mqdrain-replays goes up by one. A message
    /// at --max-retries goes to --parking-lot (or stays in the DLQ without one). Messages not
    /// matching --filter are not acknowledged and stay in the DLQ (RabbitMQ: held until the replay
    /// ends, then requeued in place; they occupy the prefetch meanwhile). Kafka: consumes under
    /// --group and commits after delivery; skipped records stay in the topic but the group's
    /// offset passes them. Stops when the DLQ had nothing new for --idle-timeout, at
    /// --max-messages, or on Ctrl-C (in-flight messages finish first).
    #[command(after_help = DLQ_HELP)]
    Replay(Box<DlqReplayArgs>),
}

#[derive(Debug, Args)]
pub struct DlqInspectArgs {
    /// The dead-letter queue (RabbitMQ) or topic (Kafka).
    pub name: String,
    /// Most messages to read (RabbitMQ: at most 65535, all held unacknowledged until the end).
    #[arg(long, default_value_t = 10_000)]
    pub max_messages: u64,
    /// Kafka: the record header that holds the dead-letter reason.
    #[arg(long, default_value = DEFAULT_REASON_HEADER)]
    pub reason_header: String,
}

impl From<&DlqInspectArgs> for DlqInspectSpec {
    fn from(args: &DlqInspectArgs) -> Self {
        DlqInspectSpec {
            name: args.name.clone(),
            max_messages: args.max_messages,
            reason_header: args.reason_header.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct DlqReplayArgs {
    /// The dead-letter queue (RabbitMQ) or topic (Kafka).
    pub name: String,
    /// Where replayed messages go: a queue (published through the default exchange) or a topic.
    #[arg(long)]
    pub to: String,
    /// Replays a message may have had (x-mqdrain-replays); at the budget it is parked instead.
    #[arg(long, default_value_t = 3)]
    pub max_retries: u64,
    /// Queue or topic for messages at the budget (must exist); without it they stay in the DLQ.
    #[arg(long)]
    pub parking_lot: Option<String>,
    /// Only move matching messages: field=value[,value...] with field reason, queue (where it
    /// first died) or routing-key; Kafka: reason only. Repeat to require several.
    #[arg(long, value_name = "FIELD=VALUES")]
    pub filter: Vec<String>,
    /// Most messages to look at (replayed, parked or left); with --dry-run, to read (default
    /// 10000).
    #[arg(long)]
    pub max_messages: Option<u64>,
    /// Most messages per second.
    #[arg(long)]
    pub rate_limit: Option<f64>,
    /// Kafka (required): the consumer group the replay commits under; a rerun continues after it.
    #[arg(long)]
    pub group: Option<String>,
    /// Kafka: the record header that holds the dead-letter reason (for --filter reason=...).
    #[arg(long, default_value = DEFAULT_REASON_HEADER)]
    pub reason_header: String,
    /// RabbitMQ consumer prefetch (at most 65535): messages left in the DLQ hold it until the end.
    #[arg(long, default_value_t = 5000)]
    pub prefetch: u16,
    /// Most messages published but not yet confirmed.
    #[arg(long, default_value_t = 500)]
    pub confirm_window: usize,
    /// Stop once the DLQ had nothing new for this long.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Publish attempts per message (with backoff) before stopping with an error.
    #[arg(long, default_value_t = 5)]
    pub max_attempts: u32,
    /// Duplicate suppression, as for `forward`; the key also counts x-mqdrain-replays, so a
    /// message dead-lettered again after its replay is replayed again.
    #[command(flatten)]
    pub dedup: super::dedup::DedupArgs,
    #[command(flatten)]
    pub dry_run: DryRun,
}

impl From<&DlqReplayArgs> for DlqReplaySpec {
    fn from(args: &DlqReplayArgs) -> Self {
        DlqReplaySpec {
            name: args.name.clone(),
            to: args.to.clone(),
            max_retries: args.max_retries,
            parking_lot: args.parking_lot.clone(),
            filter: args.filter.clone(),
            max_messages: args.max_messages,
            rate_limit: args.rate_limit,
            group: args.group.clone(),
            reason_header: args.reason_header.clone(),
            prefetch: args.prefetch,
            confirm_window: args.confirm_window,
            idle_timeout: args.idle_timeout,
            max_attempts: args.max_attempts,
            dedup: args.dedup.dedup.clone(),
            dedup_ttl: args.dedup.dedup_ttl,
            dedup_inflight_ttl: args.dedup.dedup_inflight_ttl,
            id_header: args.dedup.id_header.clone(),
            dedup_optional: args.dedup.dedup_optional,
        }
    }
}
