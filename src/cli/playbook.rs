//! Command-line types of `mqdrain playbook` and of the test/demo aid `mqdrain load`.

use crate::cli::parse_duration;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

const PLAYBOOK_HELP: &str = "\
Exit codes of `playbook run`: 0 every step succeeded (or the dry run planned them all),
1 a step failed (on_failure steps ran; with --dry-run: a step could not be planned for a reason
other than temporary queues an earlier step would create), 2 the playbook is invalid or cannot
run as asked (`playbook check` reports every problem as FILE:LINE:COLUMN; a journal --resume
cannot continue; approve steps without a terminal or --yes), 5 a bounded wait ran out: a gate's,
a step's own or an exec's timeout (the summary and the JUnit failure say which), 130 cancelled by
SIGINT/SIGTERM (background forwards are stopped gracefully and on_failure runs; a second signal
exits at once).

The format is documented in README.md (Playbooks) and by the commented playbooks in
playbooks/ (rabbitmq-drain.yaml).
The playbook's `broker:` section names the broker; --url (MQDRAIN_URL) is used only when it has
none. exec steps get MQDRAIN (this executable) and MQDRAIN_URL in their environment.

Examples:
  mqdrain playbook check playbooks/rabbitmq-drain.yaml
  mqdrain playbook run playbooks/rabbitmq-drain.yaml --var queue=orders --dry-run
  mqdrain playbook run drain.yaml --yes --junit drain.junit.xml --report drain-report.md
  mqdrain playbook run drain.yaml --var restart='kubectl scale deploy/w --replicas=3' --resume";

/// Run the runbook from a YAML playbook: the same steps as the subcommands, in order, gated.
#[derive(Debug, Args)]
#[command(after_help = PLAYBOOK_HELP)]
pub struct PlaybookArgs {
    #[command(subcommand)]
    pub command: PlaybookCommand,
}

#[derive(Debug, Subcommand)]
pub enum PlaybookCommand {
    /// Validate a playbook without touching a broker; every problem with FILE:LINE:COLUMN.
    #[command(after_help = PLAYBOOK_HELP)]
    Check(CheckArgs),
    /// Run a playbook's steps; on a failing step run its on_failure steps.
    #[command(after_help = PLAYBOOK_HELP)]
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The playbook (YAML).
    pub file: PathBuf,
    /// Override a variable declared under `vars:` (repeatable), as `run` would.
    #[arg(long = "var", value_name = "KEY=VALUE", value_parser = crate::playbook::parse_var)]
    pub vars: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The playbook (YAML).
    pub file: PathBuf,
    /// Print every step with its resolved settings and what it would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Override a variable declared under `vars:` (repeatable).
    #[arg(long = "var", value_name = "KEY=VALUE", value_parser = crate::playbook::parse_var)]
    pub vars: Vec<(String, String)>,
    /// Approve every `approve` step in advance (needed when standard input is not a terminal).
    #[arg(long)]
    pub yes: bool,
    /// Run journal recording finished steps (default: <playbook>.state.json next to it).
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Continue an earlier run from its journal: finished steps are not repeated; what a
    /// finished step established is re-verified only when a step that runs now relies on it
    /// (and no finished exec/restore changed it since); a background forward that was not
    /// stopped starts again. A run that already succeeded: nothing to do.
    #[arg(long)]
    pub resume: bool,
    /// Write a JUnit XML file with one testcase per step.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Write a Markdown post-incident report (timeline, backlog, forwarding, depth chart; the
    /// chart is also written as FILE's name with .svg).
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// How often to sample depth for the report's chart.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub sample_every: Duration,
}

/// Test and demo aid: publish a backlog, or consume like an application would.
///
/// Not part of a drain: use it to seed a queue or topic and to simulate consumers against test
/// brokers. Its connections are named `load-generator ...` (Kafka: client id `load-generator`),
/// so mqdrain treats them as someone else's application (stop-consumers waits for them to go
/// away).
#[derive(Debug, Args)]
pub struct LoadArgs {
    #[command(subcommand)]
    pub command: LoadCommand,
}

#[derive(Debug, Subcommand)]
pub enum LoadCommand {
    /// Publish N persistent messages with publisher confirms (Kafka: acks=all, spread evenly
    /// over the partitions).
    Publish(PublishArgs),
    /// Consume and acknowledge messages (Kafka: commit them under --group), optionally
    /// rate-limited, until empty or N.
    Consume(ConsumeArgs),
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Queue to publish into (through the default exchange), or Kafka topic.
    pub queue: String,
    /// How many messages.
    #[arg(long)]
    pub count: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Most messages per second (default: as fast as confirms allow).
    #[arg(long)]
    pub rate: Option<f64>,
    /// A `key` header (Kafka: the record key) cycles through this many values (key-0 ...), for
    /// `--key header:key` demos.
    #[arg(long, default_value_t = 16)]
    pub keys: u32,
    /// Declare the queue (durable, classic) if it does not exist. Kafka: create the topic
    /// (--partitions, replication factor 1) if it does not exist.
    #[arg(long)]
    pub declare: bool,
    /// Kafka: partitions of the topic --declare creates [default: 3].
    #[arg(long)]
    pub partitions: Option<i32>,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Queue or Kafka topic to consume from.
    pub queue: String,
    /// Kafka (required): the consumer group to join and commit under.
    #[arg(long)]
    pub group: Option<String>,
    /// Most messages per second (default: unlimited).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Stop once the queue stayed empty for --idle.
    #[arg(long)]
    pub until_empty: bool,
    /// With --until-empty: how long nothing must arrive (and the queue report no ready
    /// messages) before stopping.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub idle: Duration,
    /// Stop after this many messages.
    #[arg(long)]
    pub max: Option<u64>,
    /// RabbitMQ consumer prefetch.
    #[arg(long, default_value_t = 100)]
    pub prefetch: u16,
}

impl From<&PublishArgs> for crate::ops::load::PublishSpec {
    fn from(args: &PublishArgs) -> Self {
        crate::ops::load::PublishSpec {
            queue: args.queue.clone(),
            count: args.count,
            size: args.size,
            rate: args.rate,
            keys: args.keys,
            declare: args.declare,
            partitions: args.partitions,
        }
    }
}

impl From<&ConsumeArgs> for crate::ops::load::ConsumeSpec {
    fn from(args: &ConsumeArgs) -> Self {
        crate::ops::load::ConsumeSpec {
            queue: args.queue.clone(),
            group: args.group.clone(),
            rate: args.rate,
            until_empty: args.until_empty,
            idle: args.idle,
            max: args.max,
            prefetch: args.prefetch,
        }
    }
}
