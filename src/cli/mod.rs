//! Command-line types (clap derive) and their conversion into the core's specs; doc comments become `--help`.

use crate::endpoint::{self, Target};
use crate::error::{Error, Result};
use crate::ops::drain::{
    ExpandSpec, Factor, ForwardSpec, RestoreSpec, StopConsumersSpec, WatchSpec,
};
use crate::ops::forward_loop::Strategy;
use crate::ops::inspect::InspectSpec;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::time::Duration;

pub mod dedup;
pub mod dlq;
pub mod plan;
pub mod playbook;

const AFTER_HELP: &str = "\
Exit codes: 0 ok, 1 operation failed, 2 bad usage or configuration, 3 queue/topic/group/vhost not found,
4 broker or management API unreachable or credentials refused, 5 timed out, 130 cancelled.

Examples:
  mqdrain --url amqp://guest:guest@localhost:5672/%2f inspect orders
  mqdrain --url kafka://localhost:9092 inspect orders --group orders-service
  MQDRAIN_URL=amqps://ops:secret@rabbit.internal/prod mqdrain inspect orders --output json";

/// Drain a backlogged RabbitMQ queue or Kafka topic without losing a message.
///
/// The runbook: inspect the backlog, stop its consumers, add temporary capacity, forward the
/// backlog into it, watch it drain, restore the original topology.
#[derive(Debug, Parser)]
#[command(name = "mqdrain", version, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    /// Output format: `human` (progress bars on a terminal, plain lines otherwise) or `json`
    /// (one JSON document for results; progress events as JSON lines on stderr).
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Human,
    Json,
}

#[derive(Debug, Args)]
pub struct ConnectionArgs {
    /// Broker URL. amqp://user:pass@host:5672/vhost or amqps://... selects RabbitMQ (vhost
    /// percent-encoded: %2f is "/"); kafka://host:port[,host:port] selects Kafka.
    #[arg(long, env = "MQDRAIN_URL", global = true, hide_env_values = true)]
    pub url: Option<String>,

    /// RabbitMQ management HTTP API, e.g. http://host:15672. Default: the AMQP host and
    /// credentials on port 15672 (https on 15671 for amqps://). Credentials in this URL, if any,
    /// replace the AMQP ones for the API.
    #[arg(
        long,
        env = "MQDRAIN_MANAGEMENT_URL",
        global = true,
        hide_env_values = true
    )]
    pub management_url: Option<String>,

    /// Kafka client setting passed to librdkafka, as kcat does (repeatable), e.g.
    /// -X security.protocol=SASL_SSL -X sasl.mechanisms=SCRAM-SHA-512 -X sasl.username=ops
    /// -X sasl.password=...; secret values are never printed.
    #[arg(short = 'X', value_name = "KEY=VALUE", global = true)]
    pub client_config: Vec<String>,

    /// PEM file of CA certificates to trust for amqps://, https:// management and Kafka SSL.
    #[arg(long, env = "MQDRAIN_CA_FILE", global = true)]
    pub ca_file: Option<String>,
}

impl ConnectionArgs {
    pub fn target(&self) -> Result<Target> {
        let url = self.url.as_deref().ok_or_else(|| {
            Error::usage(
                "no broker given: pass --url (or set MQDRAIN_URL), e.g. --url amqp://guest:guest@localhost:5672/%2f or --url kafka://localhost:9092",
            )
        })?;
        endpoint::parse_target(
            url,
            self.management_url.as_deref(),
            &self.client_config,
            self.ca_file.as_deref(),
        )
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a queue's or topic's backlog, consumers, drain rate, ETA and the risks it runs.
    ///
    /// RabbitMQ: depth (ready + unacked), consumers with their connections, rates, queue type and
    /// the settings that decide a backlog's fate (TTL, length limits, overflow, dead-lettering,
    /// delivery limit) from arguments and policies. Kafka: per-partition watermarks, the group's
    /// committed offsets and lag, group state and members, retention settings. Read-only.
    Inspect(InspectArgs),

    /// Stop the backlog's consumers and verify they stay gone.
    ///
    /// Runs your stop command (--exec), optionally closes the consumers' connections
    /// (RabbitMQ, --close-connections), then waits until the queue has no consumers — or the Kafka
    /// group no members — and that stays so across a statistics interval. mqdrain's own
    /// connections and the broker's shovels are never touched. Fails listing what is still there.
    StopConsumers(StopConsumersArgs),

    /// Create the temporary capacity: N queues (RabbitMQ) or a topic with N x the partitions (Kafka).
    ///
    /// Copies the original's durability, type and the settings that decide a backlog's fate (TTL,
    /// length limits, overflow, dead-lettering, delivery limit; Kafka: retention and other
    /// explicitly set configs), and says what it could not copy. Rerunning with the same N does
    /// nothing.
    Expand(ExpandArgs),

    /// Move the backlog into the temporary queues/partitions; ack only after the broker confirmed.
    ///
    /// Stops at --max-messages, when the source stayed empty for --idle-timeout, or on
    /// Ctrl-C/SIGTERM (finishes in-flight messages first; a second signal exits at once with 130).
    /// Several forwarders on the same queue share the work.
    Forward(ForwardArgs),

    /// Size the drain: the factor that empties the backlog within --target while inflow goes on.
    ///
    /// Measures the backlog, its inflow and the per-consumer throughput (outflow / consumers, or
    /// --per-consumer-rate), then shows the factor N (temporary queues, or partition multiplier;
    /// one consumer per temporary queue/partition) and the ETA for a few N around it. Warns when
    /// the forwarder's ceiling, not the consumers, is the bottleneck: then more temporary queues
    /// do not help. `expand --factor auto --target T` uses the same computation. Read-only.
    Plan(plan::PlanArgs),

    /// Show the drain: depth/lag, rates and ETA of the source and every temporary queue/partition.
    Watch(WatchArgs),

    /// Remove the temporary capacity once it is empty; never deletes a queue that holds messages.
    ///
    /// Refuses while a forwarder still consumes the source or a temporary queue (partition) still
    /// holds ready or unacked messages (lag), checked twice across a statistics interval.
    Restore(RestoreArgs),

    /// Dead-letter queues: `inspect` counts what died and why, `replay` sends it back under a retry budget.
    Dlq(dlq::DlqArgs),

    /// Run the runbook from a YAML playbook: `check` validates it, `run` executes it.
    Playbook(playbook::PlaybookArgs),

    /// Test and demo aid: publish a backlog or consume like an application (RabbitMQ).
    Load(playbook::LoadArgs),
}

/// Options every mutating step shares.
#[derive(Debug, Args)]
pub struct DryRun {
    /// Print what would be done, change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct StopConsumersArgs {
    /// Queue (RabbitMQ) or topic (Kafka).
    pub name: String,
    /// Kafka consumer group that must become empty (required for Kafka).
    #[arg(long)]
    pub group: Option<String>,
    /// Your own stop command, run first with `sh -c`, e.g. "kubectl scale deploy/orders-worker --replicas=0".
    #[arg(long)]
    pub exec: Option<String>,
    /// How long --exec may run.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub exec_timeout: Duration,
    /// RabbitMQ: close the consumers' connections through the management API (needs an
    /// administrator user); apps that reconnect must still be scaled down.
    #[arg(long)]
    pub close_connections: bool,
    /// How long the consumers may take to disappear.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub wait: Duration,
    #[command(flatten)]
    pub dry_run: DryRun,
}

impl From<&StopConsumersArgs> for StopConsumersSpec {
    fn from(args: &StopConsumersArgs) -> Self {
        StopConsumersSpec {
            name: args.name.clone(),
            group: args.group.clone(),
            exec: args.exec.clone(),
            exec_timeout: args.exec_timeout,
            close_connections: args.close_connections,
            wait: args.wait,
        }
    }
}

#[derive(Debug, Args)]
pub struct ExpandArgs {
    /// Queue (RabbitMQ) or topic (Kafka).
    pub name: String,
    /// How many temporary queues (RabbitMQ) or the partition multiplier (Kafka), 1 to 1000; or
    /// auto: the smallest that drains within --target at the measured rates (see `plan`).
    #[arg(long)]
    pub factor: Factor,
    /// RabbitMQ: name prefix of the temporary queues (<queue>.drain gives <queue>.drain.0 ...);
    /// Kafka: the temporary topic (default <topic>.drain).
    #[arg(long, visible_alias = "temp-topic")]
    pub temp_prefix: Option<String>,
    /// Accept a different factor than what already exists (adds the missing ones; never deletes
    /// a queue or topic that holds messages).
    #[arg(long)]
    pub force: bool,
    /// With --factor auto: the drain must finish within this, e.g. 30m.
    #[arg(long, value_parser = parse_duration)]
    pub target: Option<Duration>,
    /// With --factor auto on Kafka: the consumer group whose lag and throughput are measured.
    #[arg(long)]
    pub group: Option<String>,
    #[command(flatten)]
    pub measure: plan::MeasureArgs,
    #[command(flatten)]
    pub dry_run: DryRun,
}

impl From<&ExpandArgs> for ExpandSpec {
    fn from(args: &ExpandArgs) -> Self {
        ExpandSpec {
            name: args.name.clone(),
            factor: args.factor,
            temp: args.temp_prefix.clone(),
            force: args.force,
            target: args.target,
            group: args.group.clone(),
            per_consumer_rate: args.measure.per_consumer_rate,
            forwarder_rate: args.measure.forwarder_rate,
            sample: args.measure.sample,
        }
    }
}

#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// Queue (RabbitMQ) or topic (Kafka) holding the backlog.
    pub name: String,
    /// Kafka: the original consumer group; the forwarder consumes under it so its offsets advance.
    #[arg(long)]
    pub group: Option<String>,
    /// Number of temporary queues to use (default: all that exist) or the Kafka multiplier.
    #[arg(long)]
    pub factor: Option<usize>,
    /// RabbitMQ: explicit target queues instead of the temporary ones (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub to: Vec<String>,
    /// Temporary queue prefix / temporary topic, as given to expand.
    #[arg(long, visible_alias = "temp-topic")]
    pub temp_prefix: Option<String>,
    /// round-robin spreads evenly; key-hash sends each key always to the same target (Kafka's
    /// murmur2), keeping per-key order.
    #[arg(long, value_enum, default_value_t = Strategy::RoundRobin)]
    pub strategy: Strategy,
    /// What key-hash hashes: routing-key (Kafka: the record key), message-id, or header:<name>.
    #[arg(long, default_value = "routing-key")]
    pub key: String,
    /// RabbitMQ consumer prefetch; must exceed --confirm-window plus --ack-batch.
    #[arg(long, default_value_t = 2000)]
    pub prefetch: u16,
    /// Most messages published but not yet confirmed (bounds memory and duplicates after a crash).
    #[arg(long, default_value_t = 1000)]
    pub confirm_window: usize,
    /// Confirmed messages acknowledged on the source together.
    #[arg(long, default_value_t = 100)]
    pub ack_batch: usize,
    /// Stop after this many messages.
    #[arg(long)]
    pub max_messages: Option<u64>,
    /// Stop once the source stayed empty this long (default: run until stopped).
    #[arg(long, value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Most messages per second, to protect a struggling broker.
    #[arg(long)]
    pub rate_limit: Option<f64>,
    /// Publish attempts per message (with backoff) before stopping with an error.
    #[arg(long, default_value_t = 5)]
    pub max_attempts: u32,
    #[command(flatten)]
    pub dry_run: DryRun,
    // Last: its help heading would otherwise also cover the options after it.
    #[command(flatten)]
    pub dedup: dedup::DedupArgs,
}

impl From<&ForwardArgs> for ForwardSpec {
    fn from(args: &ForwardArgs) -> Self {
        ForwardSpec {
            name: args.name.clone(),
            group: args.group.clone(),
            factor: args.factor,
            to: args.to.clone(),
            temp: args.temp_prefix.clone(),
            strategy: args.strategy,
            key: args.key.clone(),
            prefetch: args.prefetch,
            confirm_window: args.confirm_window,
            ack_batch: args.ack_batch,
            max_messages: args.max_messages,
            idle_timeout: args.idle_timeout,
            rate_limit: args.rate_limit,
            max_attempts: args.max_attempts,
            dedup: args.dedup.dedup.clone(),
            dedup_ttl: args.dedup.dedup_ttl,
            dedup_inflight_ttl: args.dedup.dedup_inflight_ttl,
            id_header: args.dedup.id_header.clone(),
            dedup_optional: args.dedup.dedup_optional,
        }
    }
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Queue (RabbitMQ) or topic (Kafka).
    pub name: String,
    /// Kafka: the original consumer group.
    #[arg(long)]
    pub group: Option<String>,
    /// Kafka: the temporary consumers' group on the temporary topic.
    #[arg(long)]
    pub temp_group: Option<String>,
    /// Temporary queue prefix / temporary topic, as given to expand.
    #[arg(long, visible_alias = "temp-topic")]
    pub temp_prefix: Option<String>,
    /// Exit 0 once the source and every temporary queue are empty (seen twice in a row).
    #[arg(long)]
    pub until_drained: bool,
    /// Give up after this long (exit code 5).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Time between samples.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub interval: Duration,
}

impl From<&WatchArgs> for WatchSpec {
    fn from(args: &WatchArgs) -> Self {
        WatchSpec {
            name: args.name.clone(),
            group: args.group.clone(),
            temp_group: args.temp_group.clone(),
            temp: args.temp_prefix.clone(),
            until_drained: args.until_drained,
            timeout: args.timeout,
            interval: args.interval,
        }
    }
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Queue (RabbitMQ) or topic (Kafka).
    pub name: String,
    /// Kafka: the original consumer group (the forwarder must have left it).
    #[arg(long)]
    pub group: Option<String>,
    /// Kafka: the temporary consumers' group, whose lag must be zero.
    #[arg(long)]
    pub temp_group: Option<String>,
    /// Temporary queue prefix / temporary topic, as given to expand.
    #[arg(long, visible_alias = "temp-topic")]
    pub temp_prefix: Option<String>,
    /// Wait up to this long for the temporary queues/partitions to drain before giving up.
    #[arg(long, value_parser = parse_duration)]
    pub wait: Option<Duration>,
    /// Your command that restarts the original consumers, run before the temporary queues are removed.
    #[arg(long)]
    pub exec: Option<String>,
    /// How long --exec may run.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub exec_timeout: Duration,
    /// Kafka: also delete the temporary group.
    #[arg(long)]
    pub delete_temp_group: bool,
    #[command(flatten)]
    pub dry_run: DryRun,
}

impl From<&RestoreArgs> for RestoreSpec {
    fn from(args: &RestoreArgs) -> Self {
        RestoreSpec {
            name: args.name.clone(),
            group: args.group.clone(),
            temp_group: args.temp_group.clone(),
            temp: args.temp_prefix.clone(),
            wait: args.wait,
            exec: args.exec.clone(),
            exec_timeout: args.exec_timeout,
            delete_temp_group: args.delete_temp_group,
        }
    }
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Queue (RabbitMQ) or topic (Kafka) name.
    pub name: String,

    /// Kafka consumer group whose lag to show (required for lag and the drain estimate).
    #[arg(long)]
    pub group: Option<String>,

    /// How long to measure inflow and outflow for the drain estimate, e.g. 5s, 30s, 0s to skip.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub sample: Duration,
}

impl From<&InspectArgs> for InspectSpec {
    fn from(args: &InspectArgs) -> Self {
        InspectSpec {
            name: args.name.clone(),
            group: args.group.clone(),
            sample: args.sample,
        }
    }
}

pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| {
        format!("'{text}' is not a duration ({error}); examples: 500ms, 5s, 2m, 1h30m")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap's own checks: duplicate flags, bad defaults, conflicting names, ...
        Cli::command().debug_assert();
    }
}
