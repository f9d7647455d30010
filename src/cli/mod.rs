//! Command-line types (clap derive) and their conversion into the core's specs; doc comments become `--help`.

use crate::endpoint::{self, Target};
use crate::error::{Error, Result};
use crate::ops::inspect::InspectSpec;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::time::Duration;

const AFTER_HELP: &str = "\
Exit codes: 0 ok, 1 operation failed, 2 bad usage or configuration, 3 queue/topic/group not found,
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
