//! The duplicate-suppression options of `forward` and `dlq replay` (flattened into their args).

use super::parse_duration;
use clap::Args;
use std::time::Duration;

#[derive(Debug, Args)]
#[command(next_help_heading = "Duplicate suppression")]
pub struct DedupArgs {
    /// Publish each message with a stable id once, remembering ids in Redis
    /// (redis://[:password@]host:port[/db]).
    ///
    /// Before publishing, the id's key is marked in flight (SET NX, --dedup-inflight-ttl); after
    /// the target confirmed, it is marked done for --dedup-ttl. A message whose id is done is
    /// not published again but acknowledged on the source; one whose id another forwarder holds
    /// in flight waits until that copy is done, or its mark is stale (older than
    /// --dedup-inflight-ttl: that forwarder died) and it is published. `forward` stamps the id
    /// into header x-mqdrain-id for consumers downstream.
    ///
    /// Guarantee: exactly-once publish for messages with a stable id, as long as Redis keeps the
    /// keys for the TTL. Duplicates are possible only if a forwarder dies (or loses Redis) after
    /// the target took a message but before it was marked done (at most --confirm-window
    /// messages), a publish outlasts --dedup-inflight-ttl, Redis loses keys (restart without
    /// persistence, eviction, failover) or a copy arrives after --dedup-ttl, or --dedup-optional
    /// bypassed a failed Redis. Messages without an id are forwarded unchecked and counted. Do
    /// not use it on `forward` where messages come back to the source with the same id on
    /// purpose (retry loops through dead-lettering): they would be acknowledged as duplicates.
    /// `dlq replay` counts x-mqdrain-replays in the key, so there only a second copy of the
    /// same replay is suppressed.
    #[arg(long, value_name = "REDIS_URL")]
    pub dedup: Option<String>,

    /// How long a delivered id is remembered.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub dedup_ttl: Duration,

    /// How long an in-flight mark protects a message being published; another forwarder's older
    /// mark is stale. Must outlast a publish with its retries; a rerun after a crash waits this
    /// long for the messages the crashed forwarder had in flight.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub dedup_inflight_ttl: Duration,

    /// Header carrying the stable id, instead of the message-id property (RabbitMQ) or
    /// <topic>-<partition>-<offset> of the source record (Kafka).
    #[arg(long, value_name = "NAME")]
    pub id_header: Option<String>,

    /// If Redis is unreachable or fails, forward without duplicate suppression (with a warning)
    /// instead of stopping with an error.
    #[arg(long)]
    pub dedup_optional: bool,
}
