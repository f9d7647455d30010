//! `plan` and the measurement options it shares with `expand --factor auto`.

use super::parse_duration;
use crate::ops::plan::PlanSpec;
use clap::Args;
use std::time::Duration;

/// How the rates behind a plan are measured, or given.
#[derive(Debug, Args)]
pub struct MeasureArgs {
    /// Messages per second one consumer handles. Default: measured, the backlog's outflow (acks)
    /// divided by its consumers (mqdrain's own excluded); required when no consumer runs.
    #[arg(long, value_name = "MSG_PER_S")]
    pub per_consumer_rate: Option<f64>,

    /// The most messages per second the forwarder publishes into the temporary queues on this
    /// broker. Default 10000 for RabbitMQ (a forwarder acking in batches moved ~12k msg/s on 2
    /// busy cores) and 50000 for Kafka; pass the rate your own forward runs reported.
    #[arg(long, value_name = "MSG_PER_S")]
    pub forwarder_rate: Option<f64>,

    /// How long to measure inflow and outflow.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub sample: Duration,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Queue (RabbitMQ) or topic (Kafka) holding the backlog.
    pub name: String,
    /// Kafka: the consumer group whose lag and throughput are measured (required for Kafka).
    #[arg(long)]
    pub group: Option<String>,
    /// The drain must finish within this, e.g. 30m.
    #[arg(long, value_parser = parse_duration)]
    pub target: Duration,
    #[command(flatten)]
    pub measure: MeasureArgs,
}

impl From<&PlanArgs> for PlanSpec {
    fn from(args: &PlanArgs) -> Self {
        PlanSpec {
            name: args.name.clone(),
            group: args.group.clone(),
            target: args.target,
            per_consumer_rate: args.measure.per_consumer_rate,
            sample: args.measure.sample,
            forwarder_rate: args.measure.forwarder_rate,
        }
    }
}
