//! The drain cycle on Kafka: stop-consumers, expand, forward, watch, restore.
//!
//! Kafka cannot take a backlog away from its partitions, and Nisshi (like many managed
//! services) cannot add partitions, so the drain goes through a new temporary topic with N
//! times the partitions: the forwarder consumes the source *under the original group id*
//! (so the group's committed offsets advance with every confirmed message), produces each
//! source partition `p` into the block `p*N .. p*N+N` of the temporary topic, and the operator
//! runs N times the consumers on it under a temporary group. Restore deletes the temporary
//! topic once that group consumed everything, and the original consumers resume exactly after
//! the last forwarded message.

use super::client::{self, blocking, request_error, REQUEST_TIMEOUT};
use super::forwarding::{
    format_offsets, partition_name, KafkaSink, KafkaSource, FORWARDER_CLIENT_ID,
    FORWARDER_SESSION_TIMEOUT,
};
use super::inspect::{describe_group, unknown_group};
use super::offsets::{read_offsets, PartitionOffsets};
use crate::broker::KeySource;
use crate::endpoint::KafkaTarget;
use crate::error::{Error, Result};
use crate::ops::dedup::{self, Dedup};
use crate::ops::drain::*;
use crate::ops::exec;
use crate::ops::forward_loop::{self, LoopSettings, Strategy};
use crate::progress::{Event, Level, Progress};
use rdkafka::admin::{ConfigSource, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Group id of the clients that only read metadata and offsets; it never commits.
const OBSERVER_GROUP: &str = "mqdrain-observer";
/// How often stop-consumers and restore re-read a group or a lag while waiting.
const POLL: Duration = Duration::from_millis(500);
/// How long a created or deleted topic may take to show in the metadata.
const TOPIC_SETTLE: Duration = Duration::from_secs(15);
/// Watch never samples faster than this, whatever `--interval` says.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Expand --force reads the committed offsets of at most this many groups to decide whether
/// the existing temporary topic was consumed; with more groups it cannot tell and refuses.
const MAX_GROUPS_CHECKED: usize = 500;
/// Topic configs that name partitions or brokers of the source, meaningless on another topic.
const PLACEMENT_CONFIGS: &[&str] = &[
    "leader.replication.throttled.replicas",
    "follower.replication.throttled.replicas",
    "confluent.placement.constraints",
];

/// The temporary topic: `--temp`, or `<topic>.drain`.
pub fn temp_topic(topic: &str, temp: Option<&str>) -> String {
    temp.map_or_else(|| format!("{topic}.drain"), str::to_string)
}

fn require_group<'s>(group: Option<&'s str>, step: &str, topic: &str) -> Result<&'s str> {
    match group {
        Some(group) if !group.trim().is_empty() => Ok(group),
        _ => Err(Error::usage(format!(
            "{step} on Kafka needs --group: the consumer group whose consumers read topic '{topic}'"
        ))),
    }
}

/// `--key` as the Kafka side reads it: `routing-key` is the record key.
pub fn parse_key(key: &str) -> Result<KeySource> {
    match key {
        "routing-key" => Ok(KeySource::RoutingKey),
        "message-id" => Err(Error::usage(
            "--key message-id does not exist on Kafka (records have no message id): use routing-key (the record key) or header:<name>",
        )),
        other => match other.strip_prefix("header:") {
            Some(name) if !name.is_empty() => Ok(KeySource::Header(name.to_string())),
            _ => Err(Error::usage(format!(
                "invalid --key '{other}': use routing-key (the record key) or header:<name>"
            ))),
        },
    }
}

fn not_found_topic(target: &KafkaTarget, topic: &str, hint: &str) -> Error {
    Error::NotFound {
        kind: "topic",
        name: topic.to_string(),
        scope: format!(" on kafka://{}", target.bootstrap_servers),
        hint: hint.to_string(),
    }
}

fn started(progress: &Progress, step: &str, detail: String) {
    progress.emit(Event::StepStarted {
        step: step.into(),
        detail,
    });
}

fn finished(progress: &Progress, step: &str) {
    progress.emit(Event::StepFinished { step: step.into() });
}

fn notice(progress: &Progress, level: Level, message: String) {
    progress.emit(Event::Notice { level, message });
}

fn duration_text(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

// ---------------------------------------------------------------------------------------------
// Reading topics, groups and offsets

/// What the metadata says about one topic.
struct TopicMeta {
    partitions: Vec<i32>,
    /// Replicas of the topic's partitions (the largest count among them).
    replication: usize,
    /// Brokers in the cluster.
    brokers: usize,
}

async fn topic_meta(
    target: &KafkaTarget,
    observer: &Arc<BaseConsumer>,
    topic: &str,
) -> Result<Option<TopicMeta>> {
    let consumer = Arc::clone(observer);
    let name = topic.to_string();
    let target = target.clone();
    blocking(move || {
        let metadata = consumer
            .fetch_metadata(Some(&name), REQUEST_TIMEOUT)
            .map_err(|error| {
                request_error(
                    &target,
                    &format!("reading the metadata of topic '{name}'"),
                    &error,
                )
            })?;
        let brokers = metadata.brokers().len();
        Ok(metadata
            .topics()
            .iter()
            .find(|candidate| candidate.name() == name)
            .filter(|found| found.error().is_none() && !found.partitions().is_empty())
            .map(|found| {
                let mut partitions: Vec<i32> = found.partitions().iter().map(|p| p.id()).collect();
                partitions.sort_unstable();
                let replication = found
                    .partitions()
                    .iter()
                    .map(|p| p.replicas().len())
                    .max()
                    .unwrap_or(1);
                TopicMeta {
                    partitions,
                    replication,
                    brokers,
                }
            }))
    })
    .await
}

/// Waits until the metadata shows `topic` with `partitions` partitions (`None`: gone).
async fn await_topic(
    target: &KafkaTarget,
    observer: &Arc<BaseConsumer>,
    topic: &str,
    partitions: Option<usize>,
) -> Result<()> {
    let deadline = Instant::now() + TOPIC_SETTLE;
    loop {
        let meta = topic_meta(target, observer, topic).await?;
        let now = meta.as_ref().map(|meta| meta.partitions.len());
        if now == partitions {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout(format!(
                "topic '{topic}' on {} still shows {} after {}, expected {}; check the broker, then run the step again",
                target.bootstrap_servers,
                now.map_or_else(|| "no partitions".to_string(), |n| format!("{n} partitions")),
                duration_text(TOPIC_SETTLE),
                partitions.map_or_else(|| "it gone".to_string(), |n| format!("{n} partitions"))
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn total_lag(offsets: &[PartitionOffsets]) -> u64 {
    offsets.iter().map(PartitionOffsets::lag).sum()
}

fn committed_map(offsets: &[PartitionOffsets]) -> BTreeMap<i32, i64> {
    offsets
        .iter()
        .filter_map(|p| p.committed.map(|offset| (p.partition, offset)))
        .collect()
}

/// The group's members as `ClientRef`s (Nisshi reports member ids only: client id and host are
/// `None` there).
async fn group_members(
    target: &KafkaTarget,
    observer: &Arc<BaseConsumer>,
    group: &str,
) -> Result<(String, Vec<ClientRef>)> {
    let (state, members) = describe_group(target, observer, group).await?;
    let refs = members
        .into_iter()
        .map(|member| ClientRef {
            id: member.member_id,
            host: member.host,
            who: member.client_id,
        })
        .collect();
    Ok((state, refs))
}

/// A member that is an mqdrain forwarder (Kafka prefixes member ids with the client id).
fn is_forwarder(member: &ClientRef) -> bool {
    member.id.starts_with(FORWARDER_CLIENT_ID) || member.who.as_deref() == Some(FORWARDER_CLIENT_ID)
}

fn list_clients(clients: &[ClientRef]) -> String {
    clients
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn list_lags(topic: &str, offsets: &[PartitionOffsets]) -> String {
    offsets
        .iter()
        .filter(|p| p.lag() > 0)
        .map(|p| {
            format!(
                "{} lag {}",
                partition_name(topic, usize::try_from(p.partition).unwrap_or_default()),
                p.lag()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// stop-consumers

pub async fn stop_consumers(
    target: &KafkaTarget,
    spec: &StopConsumersSpec,
    dry_run: bool,
    progress: &Progress,
) -> Result<StopConsumersOutcome> {
    let group = require_group(spec.group.as_deref(), "stop-consumers", &spec.name)?;
    if spec.close_connections {
        return Err(Error::usage(
            "--close-connections is RabbitMQ only: Kafka has no way to remove another application's group member; use --exec with your own stop command",
        ));
    }
    started(
        progress,
        "stop-consumers",
        format!(
            "group '{group}' on topic '{}' at kafka://{}",
            spec.name, target.bootstrap_servers
        ),
    );
    let observer = Arc::new(client::observer(target, group)?);
    if topic_meta(target, &observer, &spec.name).await?.is_none() {
        return Err(not_found_topic(
            target,
            &spec.name,
            "check the name (topics are case-sensitive)",
        ));
    }
    let mut actions = Vec::new();
    let (state, members) = group_members(target, &observer, group).await?;
    if dry_run {
        if let Some(command) = &spec.exec {
            actions.push(format!(
                "would run `{command}` (timeout {})",
                duration_text(spec.exec_timeout)
            ));
        }
        actions.push(format!(
            "would wait up to {} for group '{group}' to have no members; now it is {state} with {} member(s){}",
            duration_text(spec.wait),
            members.len(),
            if members.is_empty() {
                String::new()
            } else {
                format!(": {}", list_clients(&members))
            }
        ));
        finished(progress, "stop-consumers");
        return Ok(StopConsumersOutcome {
            name: spec.name.clone(),
            dry_run: true,
            exec: None,
            actions,
            remaining: members,
        });
    }

    let exec = exec::operator_command(
        spec.exec.as_deref(),
        spec.exec_timeout,
        false,
        progress,
        &mut actions,
    )
    .await?;

    // Empty twice in a row, so a consumer that is just rejoining is not missed.
    let waited = Instant::now();
    let deadline = waited + spec.wait;
    let mut empty_in_a_row = 0;
    let (state, remaining) = loop {
        let (state, members) = group_members(target, &observer, group).await?;
        empty_in_a_row = if members.is_empty() {
            empty_in_a_row + 1
        } else {
            0
        };
        let now = Instant::now();
        if empty_in_a_row >= 2 || (members.is_empty() && now + POLL > deadline) {
            break (state, members);
        }
        if now >= deadline {
            break (state, members);
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(now))).await;
    };
    if !remaining.is_empty() {
        finished(progress, "stop-consumers");
        return Err(Error::Broker(format!(
            "group '{group}' on topic '{}' still has {} member(s) after {} ({state}): {}. Stop those consumers (a consumer that crashed leaves only after its session.timeout.ms), or raise --wait, then run stop-consumers again",
            spec.name,
            remaining.len(),
            duration_text(spec.wait),
            list_clients(&remaining)
        )));
    }
    actions.push(format!(
        "group '{group}' has no members ({state}) after {:.1}s",
        waited.elapsed().as_secs_f64()
    ));
    finished(progress, "stop-consumers");
    Ok(StopConsumersOutcome {
        name: spec.name.clone(),
        dry_run: false,
        exec,
        actions,
        remaining,
    })
}

// ---------------------------------------------------------------------------------------------
// expand

/// The source's explicitly set configs that the temporary topic gets, and the ones it does not.
async fn settings_to_copy(
    target: &KafkaTarget,
    topic: &str,
    replication: usize,
) -> Result<(Vec<(String, String)>, Vec<String>)> {
    let admin = client::admin(target)?;
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &client::admin_options())
        .await
        .map_err(|error| {
            request_error(
                target,
                &format!("reading the configs of topic '{topic}'"),
                &error,
            )
        })?;
    let resource = described
        .into_iter()
        .next()
        .ok_or_else(|| {
            Error::Broker(format!(
                "Kafka at {} returned no configs for topic '{topic}'; expand copies retention and cleanup settings from it, so it stops here. Check the broker's DescribeConfigs support",
                target.bootstrap_servers
            ))
        })?
        .map_err(|code| {
            Error::Broker(format!(
                "Kafka at {} refused to describe the configs of topic '{topic}': {code}; expand copies retention and cleanup settings from it, so it stops here. Check the permissions (DescribeConfigs on the topic)",
                target.bootstrap_servers
            ))
        })?;
    let mut entries = resource.entries;
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut copied = Vec::new();
    let mut dropped = Vec::new();
    for entry in entries {
        let inherited = matches!(
            entry.source,
            ConfigSource::Default
                | ConfigSource::StaticBroker
                | ConfigSource::DynamicBroker
                | ConfigSource::DynamicDefaultBroker
        );
        if entry.is_default || inherited {
            // The temporary topic inherits the same broker default.
            continue;
        }
        let name = entry.name;
        let Some(value) = entry.value else {
            dropped.push(format!("{name}: the broker did not return its value"));
            continue;
        };
        if entry.is_sensitive {
            dropped.push(format!("{name}: sensitive, its value cannot be read"));
        } else if entry.is_read_only {
            dropped.push(format!("{name}={value}: read-only"));
        } else if PLACEMENT_CONFIGS.contains(&name.as_str()) {
            dropped.push(format!(
                "{name}={value}: names partitions or brokers of the source topic"
            ));
        } else if name == "min.insync.replicas"
            && value.parse::<usize>().is_ok_and(|min| min > replication)
        {
            dropped.push(format!(
                "{name}={value}: lowered to {replication}, the temporary topic's replication factor (acks=all could never be satisfied)"
            ));
            copied.push((name, replication.to_string()));
        } else {
            copied.push((name, value));
        }
    }
    Ok((copied, dropped))
}

/// Whether an existing temporary topic may be deleted: it must hold no unconsumed message.
enum Deletable {
    Yes(String),
    No(String),
}

async fn deletable(
    target: &KafkaTarget,
    observer: &Arc<BaseConsumer>,
    topic: &str,
    partitions: &[i32],
) -> Result<Deletable> {
    let watermarks = read_offsets(target, observer, topic, partitions, false).await?;
    let messages: u64 = watermarks.iter().map(PartitionOffsets::lag).sum();
    if messages == 0 {
        return Ok(Deletable::Yes("it holds no messages".to_string()));
    }
    let consumer = Arc::clone(observer);
    let listed = blocking(move || {
        Ok(consumer
            .fetch_group_list(None, REQUEST_TIMEOUT)
            .map(|list| {
                list.groups()
                    .iter()
                    .map(|group| group.name().to_string())
                    .filter(|name| name != OBSERVER_GROUP)
                    .collect::<Vec<_>>()
            })
            .map_err(|error| error.to_string()))
    })
    .await?;
    let groups = match listed {
        Ok(groups) => groups,
        Err(error) => {
            return Ok(Deletable::No(format!(
                "it holds {messages} message(s) and the consumer groups cannot be listed ({error}), so it cannot tell whether they were consumed"
            )))
        }
    };
    if groups.len() > MAX_GROUPS_CHECKED {
        return Ok(Deletable::No(format!(
            "it holds {messages} message(s) and the cluster has {} consumer groups, too many to check which of them consumed it",
            groups.len()
        )));
    }
    // One client per group (committed offsets are read under the client's group id), all in
    // one blocking task; the watermarks read above serve every group.
    let checker_target = target.clone();
    let checked_topic = topic.to_string();
    let per_group = blocking(move || {
        let mut per_group = Vec::with_capacity(groups.len());
        for group in groups {
            let consumer = client::observer(&checker_target, &group)?;
            let mut list = TopicPartitionList::new();
            for partition in &watermarks {
                list.add_partition(&checked_topic, partition.partition);
            }
            let committed = consumer
                .committed_offsets(list, REQUEST_TIMEOUT)
                .map_err(|error| {
                    request_error(
                        &checker_target,
                        &format!("reading the committed offsets of group '{group}'"),
                        &error,
                    )
                })?;
            let offsets: Vec<PartitionOffsets> = watermarks
                .iter()
                .map(|partition| PartitionOffsets {
                    committed: committed
                        .find_partition(&checked_topic, partition.partition)
                        .and_then(|element| match element.offset() {
                            Offset::Offset(offset) if offset >= 0 => Some(offset),
                            _ => None,
                        }),
                    ..partition.clone()
                })
                .collect();
            per_group.push((group, offsets));
        }
        Ok(per_group)
    })
    .await?;
    let mut consumed_by = Vec::new();
    for (group, offsets) in per_group {
        if offsets.iter().all(|p| p.committed.is_none()) {
            continue;
        }
        let lag = total_lag(&offsets);
        if lag > 0 {
            return Ok(Deletable::No(format!(
                "group '{group}' has not consumed {lag} of its message(s) yet ({})",
                list_lags(topic, &offsets)
            )));
        }
        consumed_by.push(group);
    }
    if consumed_by.is_empty() {
        Ok(Deletable::No(format!(
            "it holds {messages} message(s) and no consumer group committed offsets on it, so they were never consumed"
        )))
    } else {
        Ok(Deletable::Yes(format!(
            "every message was consumed by group(s) {}",
            consumed_by.join(", ")
        )))
    }
}

async fn delete_topic(target: &KafkaTarget, topic: &str) -> Result<()> {
    let admin = client::admin(target)?;
    let results = admin
        .delete_topics(&[topic], &client::admin_options())
        .await
        .map_err(|error| request_error(target, &format!("deleting topic '{topic}'"), &error))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((name, code)) => {
                return Err(Error::Broker(format!(
                    "Kafka at {} refused to delete topic '{name}': {code}; check the permissions (DeleteTopics), then run the step again",
                    target.bootstrap_servers
                )))
            }
        }
    }
    Ok(())
}

pub async fn create_topic(
    target: &KafkaTarget,
    topic: &str,
    partitions: i32,
    replication: i32,
    settings: &[(String, String)],
) -> Result<()> {
    let admin = client::admin(target)?;
    let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
    for (name, value) in settings {
        new_topic = new_topic.set(name, value);
    }
    // A topic deleted a moment ago may still exist while the broker finishes deleting it.
    let deadline = Instant::now() + TOPIC_SETTLE;
    loop {
        let results = admin
            .create_topics([&new_topic], &client::admin_options())
            .await
            .map_err(|error| request_error(target, &format!("creating topic '{topic}'"), &error))?;
        match results.into_iter().next() {
            Some(Ok(_)) => return Ok(()),
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Some(Err((_, code))) => {
                return Err(Error::Broker(format!(
                    "Kafka at {} refused to create topic '{topic}' ({partitions} partitions, replication factor {replication}, configs {}): {code}; check the broker's limits and permissions, or choose another name with --temp",
                    target.bootstrap_servers,
                    if settings.is_empty() {
                        "none".to_string()
                    } else {
                        settings
                            .iter()
                            .map(|(name, value)| format!("{name}={value}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                )))
            }
            None => {
                return Err(Error::Broker(format!(
                    "Kafka at {} gave no answer to creating topic '{topic}'; check whether it exists, then run expand again",
                    target.bootstrap_servers
                )))
            }
        }
    }
}

pub async fn expand(
    target: &KafkaTarget,
    spec: &ExpandSpec,
    factor: usize,
    dry_run: bool,
    progress: &Progress,
) -> Result<ExpandOutcome> {
    let temp = temp_topic(&spec.name, spec.temp.as_deref());
    if temp == spec.name {
        return Err(Error::usage(format!(
            "--temp '{temp}' is the source topic itself: give the temporary topic another name"
        )));
    }
    started(
        progress,
        "expand",
        format!(
            "topic '{}' into '{temp}' (x{}) on kafka://{}",
            spec.name, factor, target.bootstrap_servers
        ),
    );
    let observer = Arc::new(client::observer(target, OBSERVER_GROUP)?);
    let source = topic_meta(target, &observer, &spec.name)
        .await?
        .ok_or_else(|| {
            not_found_topic(
                target,
                &spec.name,
                "check the name (topics are case-sensitive)",
            )
        })?;
    let source_partitions = source.partitions.len();
    let partitions = source_partitions
        .checked_mul(factor)
        .and_then(|n| i32::try_from(n).ok())
        .ok_or_else(|| {
            Error::usage(format!(
                "--factor {} times the {source_partitions} partitions of '{}' is too many partitions",
                factor, spec.name
            ))
        })?;
    let partition_count = usize::try_from(partitions).unwrap_or_default();
    let brokers = source.brokers.max(1);
    let replication = source.replication.clamp(1, brokers);
    let mut actions = Vec::new();
    let (copied, dropped) = settings_to_copy(target, &spec.name, replication).await?;
    let layout = format!(
        "{partitions} partitions ({} × {source_partitions}: source partition p → partitions p×{}..p×{}+{})",
        factor,
        factor,
        factor,
        factor - 1
    );

    let existing = topic_meta(target, &observer, &temp).await?;
    let mut unchanged = false;
    match existing {
        Some(meta) if meta.partitions.len() == partition_count => {
            unchanged = true;
            actions.push(format!(
                "temporary topic '{temp}' already exists with {partitions} partitions ({} × {source_partitions}): nothing to do",
                factor
            ));
        }
        Some(meta) => {
            let now = meta.partitions.len();
            if !spec.force {
                let same = if now % source_partitions == 0 {
                    format!(
                        "rerun with --factor {} (the existing layout), or ",
                        now / source_partitions
                    )
                } else {
                    String::new()
                };
                return Err(Error::usage(format!(
                    "temporary topic '{temp}' already exists with {now} partitions, but --factor {} needs {partitions} ({} × {source_partitions}); {same}add --force to delete and recreate it (only done while it holds no unconsumed messages), or choose another --temp",
                    factor, factor
                )));
            }
            match deletable(target, &observer, &temp, &meta.partitions).await? {
                Deletable::No(reason) => {
                    return Err(Error::Broker(format!(
                        "refusing to delete temporary topic '{temp}' ({now} partitions) even with --force: {reason}. Let its consumers finish (watch --until-drained), or run expand with --factor {} / another --temp",
                        if now % source_partitions == 0 {
                            (now / source_partitions).to_string()
                        } else {
                            "<its layout>".to_string()
                        }
                    )))
                }
                Deletable::Yes(reason) => {
                    if dry_run {
                        actions.push(format!(
                            "would delete temporary topic '{temp}' ({now} partitions; {reason}) to recreate it"
                        ));
                    } else {
                        delete_topic(target, &temp).await?;
                        await_topic(target, &observer, &temp, None).await?;
                        actions.push(format!(
                            "deleted temporary topic '{temp}' ({now} partitions; {reason})"
                        ));
                    }
                }
            }
        }
        None => {}
    }

    if !unchanged {
        let replication_note = if replication < source.replication {
            format!(
                "replication factor {replication} (the source has {}, capped to the {brokers} broker(s) of this cluster)",
                source.replication
            )
        } else {
            format!("replication factor {replication} (as the source)")
        };
        let configs = if copied.is_empty() {
            "no explicit configs to copy".to_string()
        } else {
            format!(
                "configs {}",
                copied
                    .iter()
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        if dry_run {
            actions.push(format!(
                "would create temporary topic '{temp}' with {layout}, {replication_note}, {configs}"
            ));
        } else {
            let replication_i32 = i32::try_from(replication).unwrap_or(1);
            create_topic(target, &temp, partitions, replication_i32, &copied).await?;
            await_topic(target, &observer, &temp, Some(partition_count)).await?;
            actions.push(format!(
                "created temporary topic '{temp}' with {layout}, {replication_note}, {configs}"
            ));
        }
    }
    for note in &dropped {
        notice(progress, Level::Info, format!("not copied: {note}"));
    }
    finished(progress, "expand");
    Ok(ExpandOutcome {
        name: spec.name.clone(),
        dry_run,
        temporary: vec![temp],
        partitions: Some(partitions),
        unchanged,
        actions,
        copied_settings: if unchanged { Vec::new() } else { copied },
        dropped_settings: if unchanged { Vec::new() } else { dropped },
    })
}

// ---------------------------------------------------------------------------------------------
// forward

fn validate_forward(spec: &ForwardSpec) -> Result<()> {
    if !spec.to.is_empty() {
        return Err(Error::usage(
            "--to is RabbitMQ only: on Kafka forward always writes into the temporary topic (--temp)",
        ));
    }
    if spec.confirm_window == 0 {
        return Err(Error::usage("--confirm-window must be at least 1"));
    }
    if spec.ack_batch == 0 {
        return Err(Error::usage("--ack-batch must be at least 1"));
    }
    if spec.max_attempts == 0 {
        return Err(Error::usage("--max-attempts must be at least 1"));
    }
    if let Some(rate) = spec.rate_limit {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(Error::usage(format!(
                "--rate-limit {rate} must be a positive number of messages per second"
            )));
        }
    }
    Ok(())
}

fn strategy_name(strategy: Strategy, key: &KeySource) -> String {
    match strategy {
        Strategy::RoundRobin => "round-robin within each block".to_string(),
        Strategy::KeyHash => match key {
            KeySource::Header(name) => {
                format!("key-hash (murmur2 of header '{name}') within each block")
            }
            _ => "key-hash (murmur2 of the record key, as Java producers) within each block"
                .to_string(),
        },
    }
}

/// The partition multiplier: `--factor`, or the temporary topic's partitions / the source's.
fn fanout(
    spec: &ForwardSpec,
    temp: &str,
    temp_partitions: usize,
    source_partitions: usize,
) -> Result<usize> {
    match spec.factor {
        Some(factor) if factor.checked_mul(source_partitions) == Some(temp_partitions) => {
            Ok(factor)
        }
        Some(factor) => Err(Error::usage(format!(
            "temporary topic '{temp}' has {temp_partitions} partitions, but --factor {factor} needs {} ({factor} × the {source_partitions} of '{}'); give the factor expand used, or leave --factor out",
            factor.saturating_mul(source_partitions),
            spec.name
        ))),
        None if source_partitions > 0 && temp_partitions % source_partitions == 0 => {
            Ok(temp_partitions / source_partitions)
        }
        None => Err(Error::usage(format!(
            "temporary topic '{temp}' has {temp_partitions} partitions, not a multiple of the {source_partitions} of '{}': it was not made by expand for this topic. Check --temp, or recreate it with expand --force",
            spec.name
        ))),
    }
}

/// Refuses while the group has members; a forwarder that was killed stays a member until its
/// session times out, so only forwarder members are waited for.
async fn ensure_no_members(
    target: &KafkaTarget,
    observer: &Arc<BaseConsumer>,
    group: &str,
    topic: &str,
    progress: &Progress,
) -> Result<()> {
    let (_, members) = group_members(target, observer, group).await?;
    if members.is_empty() {
        return Ok(());
    }
    if !members.iter().all(is_forwarder) {
        return Err(members_refusal(group, topic, &members));
    }
    let wait = FORWARDER_SESSION_TIMEOUT + Duration::from_secs(5);
    notice(
        progress,
        Level::Warn,
        format!(
            "group '{group}' still lists forwarder member(s) {} (a forwarder that was killed?); waiting up to {} for the broker to drop them",
            list_clients(&members),
            duration_text(wait)
        ),
    );
    let deadline = Instant::now() + wait;
    loop {
        tokio::time::sleep(POLL).await;
        let (_, members) = group_members(target, observer, group).await?;
        if members.is_empty() {
            return Ok(());
        }
        if !members.iter().all(is_forwarder) || Instant::now() >= deadline {
            return Err(members_refusal(group, topic, &members));
        }
    }
}

fn members_refusal(group: &str, topic: &str, members: &[ClientRef]) -> Error {
    let forwarders = members.iter().filter(|member| is_forwarder(member)).count();
    let hint = if forwarders == members.len() {
        "another mqdrain forward is running on this group: let it finish or stop it (Ctrl-C), then run forward again".to_string()
    } else {
        format!("forwarding now would share the partitions with them and commit offsets under them. Stop them first (mqdrain stop-consumers {topic} --group {group}), then run forward again")
    };
    Error::Broker(format!(
        "group '{group}' still has {} member(s) on topic '{topic}': {}; {hint}",
        members.len(),
        list_clients(members)
    ))
}

pub async fn forward(
    target: &KafkaTarget,
    spec: &ForwardSpec,
    dry_run: bool,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<ForwardOutcome> {
    let group = require_group(spec.group.as_deref(), "forward", &spec.name)?;
    let key = parse_key(&spec.key)?;
    validate_forward(spec)?;
    let temp = temp_topic(&spec.name, spec.temp.as_deref());
    if temp == spec.name {
        return Err(Error::usage(format!(
            "--temp '{temp}' is the source topic itself: forward into the temporary topic expand created"
        )));
    }
    started(
        progress,
        "forward",
        format!(
            "topic '{}' as group '{group}' into '{temp}' on kafka://{}",
            spec.name, target.bootstrap_servers
        ),
    );
    let observer = Arc::new(client::observer(target, group)?);
    let source = topic_meta(target, &observer, &spec.name)
        .await?
        .ok_or_else(|| {
            not_found_topic(
                target,
                &spec.name,
                "check the name (topics are case-sensitive)",
            )
        })?;
    let source_partitions = source.partitions.len();
    let temp_meta = topic_meta(target, &observer, &temp).await?;
    let mut actions = Vec::new();

    let offsets = read_offsets(target, &observer, &spec.name, &source.partitions, true).await?;
    let (_, members) = group_members(target, &observer, group).await?;
    if offsets.iter().all(|p| p.committed.is_none()) && members.is_empty() {
        // Forwarding a whole topic under a mistyped group would hand its entire history to
        // the temporary consumers.
        return Err(unknown_group(target, &observer, group, &spec.name).await);
    }
    let never_committed: Vec<String> = offsets
        .iter()
        .filter(|p| p.committed.is_none())
        .map(|p| format!("{} (from offset {})", p.partition, p.low))
        .collect();
    if !never_committed.is_empty() {
        notice(
            progress,
            Level::Warn,
            format!(
                "group '{group}' never committed on partition(s) {} of '{}': they are forwarded from their oldest message",
                never_committed.join(", "),
                spec.name
            ),
        );
    }
    let lag = total_lag(&offsets);

    let Some(temp_meta) = temp_meta else {
        if dry_run {
            actions.push(format!(
                "would consume topic '{}' ({source_partitions} partitions) as group '{group}' from its committed offsets (lag {lag} now)",
                spec.name
            ));
            actions.push(format!(
                "temporary topic '{temp}' does not exist yet: expand must create it first"
            ));
            finished(progress, "forward");
            return Ok(ForwardOutcome {
                name: spec.name.clone(),
                dry_run,
                targets: vec![temp],
                actions,
                result: None,
            });
        }
        return Err(not_found_topic(
            target,
            &temp,
            &format!(
                "it is the temporary topic forward writes into: run expand {} --factor N first (or give --temp)",
                spec.name
            ),
        ));
    };
    let temp_partitions = temp_meta.partitions.len();
    let factor = fanout(spec, &temp, temp_partitions, source_partitions)?;
    let targets: Vec<String> = (0..temp_partitions)
        .map(|partition| partition_name(&temp, partition))
        .collect();
    let consume_line = format!(
        "topic '{}' ({source_partitions} partitions) as group '{group}' from its committed offsets {} (lag {lag})",
        spec.name,
        format_offsets(&committed_map(&offsets))
    );
    let produce_line = format!(
        "temporary topic '{temp}' ({temp_partitions} partitions, {factor} per source partition: p → p×{factor}..p×{factor}+{}) with an idempotent producer (acks=all), {}",
        factor - 1,
        strategy_name(spec.strategy, &key)
    );

    let dedup_line = dedup::describe(
        &spec.dedup_settings(),
        "<topic>-<partition>-<offset>",
        &dedup::stamping(),
        dry_run,
    );
    if dry_run {
        actions.push(format!("would consume {consume_line}"));
        actions.push(format!("would produce to {produce_line}"));
        actions.extend(dedup_line);
        if !members.is_empty() {
            actions.push(format!(
                "would refuse now: group '{group}' has {} member(s): {}",
                members.len(),
                list_clients(&members)
            ));
        }
        finished(progress, "forward");
        return Ok(ForwardOutcome {
            name: spec.name.clone(),
            dry_run,
            targets,
            actions,
            result: None,
        });
    }

    let dedup = Dedup::open(
        &spec.dedup_settings(),
        &["kafka", &spec.name, group],
        progress,
    )
    .await?;
    let sink = KafkaSink::new(target, &temp, factor, temp_partitions)?;
    // Waiting for a dead forwarder to leave and joining the group both take seconds: a stop
    // signal ends them (nothing was consumed yet).
    let source_side = tokio::select! {
        joined = async {
            ensure_no_members(target, &observer, group, &spec.name, progress).await?;
            KafkaSource::start(target, &spec.name, group).await
        } => joined?,
        _ = cancel.cancelled() => {
            finished(progress, "forward");
            return Err(Error::Cancelled);
        }
    };
    actions.push(format!("consumed {consume_line}"));
    actions.push(format!("produced to {produce_line}"));
    actions.extend(dedup_line);
    let result = forward_loop::run(
        source_side,
        sink,
        &LoopSettings::from_spec(spec, key, dedup),
        progress,
        cancel,
    )
    .await?;
    let after = read_offsets(target, &observer, &spec.name, &source.partitions, true).await?;
    actions.push(format!(
        "group '{group}' now committed at {} (lag {}): its consumers resume after the last forwarded message",
        format_offsets(&committed_map(&after)),
        total_lag(&after)
    ));
    finished(progress, "forward");
    Ok(ForwardOutcome {
        name: spec.name.clone(),
        dry_run,
        targets,
        actions,
        result: Some(result),
    })
}

// ---------------------------------------------------------------------------------------------
// watch

/// Rates between two readings of one backlog.
fn backlog(
    name: String,
    depth: Option<u64>,
    now: (i64, Option<i64>),
    before: Option<(i64, Option<i64>, f64)>,
) -> Backlog {
    // now: (high, consumed); before: (high, consumed, seconds between the readings)
    let (in_rate, out_rate) = match before {
        Some((high, consumed, secs)) if secs > 0.0 => (
            Some((now.0 - high).max(0) as f64 / secs),
            match (now.1, consumed) {
                (Some(now), Some(then)) => Some((now - then).max(0) as f64 / secs),
                _ => None,
            },
        ),
        _ => (None, None),
    };
    let eta_secs = match (depth, in_rate, out_rate) {
        (Some(0), _, _) => Some(0.0),
        (Some(depth), Some(inflow), Some(outflow)) if outflow - inflow > 1e-3 => {
            Some(depth as f64 / (outflow - inflow))
        }
        _ => None,
    };
    Backlog {
        name,
        depth,
        in_rate,
        out_rate,
        eta_secs,
    }
}

struct Reading {
    at: Instant,
    source: Vec<PartitionOffsets>,
    temp: Vec<PartitionOffsets>,
}

pub async fn watch(
    target: &KafkaTarget,
    spec: &WatchSpec,
    progress: &Progress,
    cancel: &CancellationToken,
    on_sample: &mut (dyn FnMut(&WatchSample) + Send),
) -> Result<WatchOutcome> {
    let group = require_group(spec.group.as_deref(), "watch", &spec.name)?;
    let temp_group = spec
        .temp_group
        .as_deref()
        .filter(|temp_group| !temp_group.trim().is_empty());
    let temp = temp_topic(&spec.name, spec.temp.as_deref());
    if spec.until_drained && temp_group.is_none() {
        return Err(Error::usage(format!(
            "watch --until-drained on Kafka needs --temp-group: the group consuming '{temp}'; without it the temporary topic's backlog is unknown"
        )));
    }
    started(
        progress,
        "watch",
        format!(
            "lag of group '{group}' on '{}' and of {} on '{temp}'",
            spec.name,
            temp_group.map_or_else(
                || "(no --temp-group)".to_string(),
                |g| format!("group '{g}'")
            )
        ),
    );
    let source_observer = Arc::new(client::observer(target, group)?);
    let temp_observer = Arc::new(client::observer(
        target,
        temp_group.unwrap_or(OBSERVER_GROUP),
    )?);
    let source = topic_meta(target, &source_observer, &spec.name)
        .await?
        .ok_or_else(|| {
            not_found_topic(
                target,
                &spec.name,
                "check the name (topics are case-sensitive)",
            )
        })?;
    let temp_meta = topic_meta(target, &temp_observer, &temp)
        .await?
        .ok_or_else(|| {
            not_found_topic(
                target,
                &temp,
                "it is the temporary topic: run expand first, or give --temp (after restore it is gone)",
            )
        })?;
    if temp_group.is_none() {
        notice(
            progress,
            Level::Info,
            format!(
                "no --temp-group: the backlog of '{temp}' is unknown, only its inflow is shown"
            ),
        );
    }
    let sampler = TopicWatch {
        target: target.clone(),
        group: group.to_string(),
        temp_group: temp_group.map(str::to_string),
        topic: spec.name.clone(),
        temp,
        source_observer,
        temp_observer,
        source_partitions: source.partitions,
        temp_partitions: temp_meta.partitions,
        previous: None,
    };
    watch_with(
        spec,
        spec.interval.max(MIN_INTERVAL),
        sampler,
        progress,
        cancel,
        on_sample,
    )
    .await
}

/// Samples the original group's lag on the source and the temporary group's lag per temporary
/// partition; rates come from the difference to the previous reading.
struct TopicWatch {
    target: KafkaTarget,
    group: String,
    temp_group: Option<String>,
    topic: String,
    temp: String,
    source_observer: Arc<BaseConsumer>,
    temp_observer: Arc<BaseConsumer>,
    source_partitions: Vec<i32>,
    temp_partitions: Vec<i32>,
    previous: Option<Reading>,
}

impl WatchSampler for TopicWatch {
    async fn sample(&mut self) -> Result<(Backlog, Vec<Backlog>)> {
        let temp_group = self.temp_group.as_deref();
        let reading = Reading {
            source: read_offsets(
                &self.target,
                &self.source_observer,
                &self.topic,
                &self.source_partitions,
                true,
            )
            .await?,
            temp: read_offsets(
                &self.target,
                &self.temp_observer,
                &self.temp,
                &self.temp_partitions,
                temp_group.is_some(),
            )
            .await?,
            at: Instant::now(),
        };
        let previous = self.previous.as_ref();
        let secs = previous.map(|before| reading.at.duration_since(before.at).as_secs_f64());
        let sum = |offsets: &[PartitionOffsets]| -> (i64, Option<i64>) {
            (
                offsets.iter().map(|p| p.high).sum(),
                Some(offsets.iter().map(PartitionOffsets::consumed_up_to).sum()),
            )
        };
        let source_backlog = backlog(
            self.topic.clone(),
            Some(total_lag(&reading.source)),
            sum(&reading.source),
            previous.zip(secs).map(|(before, secs)| {
                let (high, consumed) = sum(&before.source);
                (high, consumed, secs)
            }),
        );
        let temporary: Vec<Backlog> = reading
            .temp
            .iter()
            .map(|partition| {
                let consumed = temp_group.map(|_| partition.consumed_up_to());
                let before = previous.zip(secs).and_then(|(before, secs)| {
                    before
                        .temp
                        .iter()
                        .find(|p| p.partition == partition.partition)
                        .map(|p| (p.high, temp_group.map(|_| p.consumed_up_to()), secs))
                });
                backlog(
                    partition_name(
                        &self.temp,
                        usize::try_from(partition.partition).unwrap_or_default(),
                    ),
                    temp_group.map(|_| partition.lag()),
                    (partition.high, consumed),
                    before,
                )
            })
            .collect();
        self.previous = Some(reading);
        Ok((source_backlog, temporary))
    }

    fn timeout_message(&self, last: &WatchSample, timeout: Duration) -> String {
        format!(
            "after {}, group '{}' still lags {} on '{}' and {} on '{}'; raise --timeout, or add consumers to the temporary group",
            duration_text(timeout),
            self.group,
            last.source.depth.unwrap_or_default(),
            self.topic,
            self.temp_group.as_deref().map_or_else(
                || "an unknown backlog (no --temp-group)".to_string(),
                |g| format!(
                    "group '{g}' lags {}",
                    last.temporary.iter().filter_map(|b| b.depth).sum::<u64>()
                )
            ),
            self.temp
        )
    }
}

// ---------------------------------------------------------------------------------------------
// restore

async fn delete_group(target: &KafkaTarget, group: &str) -> std::result::Result<(), String> {
    let admin = client::admin(target).map_err(|error| error.to_string())?;
    let results = admin
        .delete_groups(&[group], &client::admin_options())
        .await
        .map_err(|error| format!("the broker did not accept DeleteGroups ({error})"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
            Err((_, RDKafkaErrorCode::NonEmptyGroup)) => {
                return Err("it still has members; stop the temporary consumers, then delete it (kafka-consumer-groups --delete)".to_string())
            }
            Err((_, code)) => return Err(format!("{code}")),
        }
    }
    Ok(())
}

pub async fn restore(
    target: &KafkaTarget,
    spec: &RestoreSpec,
    dry_run: bool,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<RestoreOutcome> {
    let group = require_group(spec.group.as_deref(), "restore", &spec.name)?;
    let temp = temp_topic(&spec.name, spec.temp.as_deref());
    if temp == spec.name {
        return Err(Error::usage(format!(
            "--temp '{temp}' is the source topic itself: restore deletes the temporary topic, never the source"
        )));
    }
    let temp_group = spec
        .temp_group
        .as_deref()
        .filter(|temp_group| !temp_group.trim().is_empty())
        .ok_or_else(|| {
            Error::usage(format!(
                "restore on Kafka needs --temp-group: the group consuming '{temp}', whose lag must be 0 before the topic is deleted"
            ))
        })?;
    started(
        progress,
        "restore",
        format!(
            "topic '{}' and group '{group}' from '{temp}' on kafka://{}",
            spec.name, target.bootstrap_servers
        ),
    );
    let observer = Arc::new(client::observer(target, group)?);
    let temp_observer = Arc::new(client::observer(target, temp_group)?);
    let mut actions = Vec::new();
    let mut deleted = Vec::new();
    let source = topic_meta(target, &observer, &spec.name)
        .await?
        .ok_or_else(|| {
            not_found_topic(
                target,
                &spec.name,
                "check the name (topics are case-sensitive)",
            )
        })?;

    let Some(temp_meta) = topic_meta(target, &observer, &temp).await? else {
        actions.push(format!(
            "temporary topic '{temp}' does not exist: nothing to restore (already restored?)"
        ));
        if spec.delete_temp_group && !dry_run {
            match delete_group(target, temp_group).await {
                Ok(()) => {
                    actions.push(format!("deleted group '{temp_group}'"));
                    deleted.push(format!("group {temp_group}"));
                }
                Err(reason) => {
                    actions.push(format!("did not delete group '{temp_group}': {reason}"))
                }
            }
        }
        // The original consumers still need their restart, e.g. on a rerun after a crash.
        let exec = exec::operator_command(
            spec.exec.as_deref(),
            spec.exec_timeout,
            dry_run,
            progress,
            &mut actions,
        )
        .await?;
        finished(progress, "restore");
        return Ok(RestoreOutcome {
            name: spec.name.clone(),
            dry_run,
            exec,
            deleted,
            actions,
        });
    };

    // A forwarder still in the original group would keep writing into the temporary topic and
    // share the partitions with the restarted original consumers.
    let (_, members) = group_members(target, &observer, group).await?;
    let forwarders: Vec<ClientRef> = members
        .iter()
        .filter(|m| is_forwarder(m))
        .cloned()
        .collect();
    let mut blockers = Vec::new();
    if !forwarders.is_empty() {
        blockers.push(format!(
            "the forwarder is still a member of group '{group}' ({}): stop forward first (Ctrl-C, or let --idle-timeout end it)",
            list_clients(&forwarders)
        ));
    }
    let others = members.len() - forwarders.len();
    if others > 0 {
        actions.push(format!(
            "group '{group}' already has {others} member(s) that are not the forwarder (the original consumers?)"
        ));
    }
    let lag = read_offsets(target, &temp_observer, &temp, &temp_meta.partitions, true).await?;
    let temp_lag = total_lag(&lag);
    if temp_lag > 0 && spec.wait.is_none() {
        blockers.push(format!(
            "group '{temp_group}' has not consumed {temp_lag} message(s) of '{temp}' yet: {}; let the temporary consumers finish (watch --until-drained) or give --wait",
            list_lags(&temp, &lag)
        ));
    }
    if dry_run {
        if let Some(command) = &spec.exec {
            actions.push(format!(
                "would run `{command}` to restart the original consumers"
            ));
        }
        if temp_lag > 0 {
            if let Some(wait) = spec.wait {
                actions.push(format!(
                    "would wait up to {} for group '{temp_group}' to consume the {temp_lag} message(s) left on '{temp}'",
                    duration_text(wait)
                ));
            }
        }
        actions.push(format!(
            "would delete temporary topic '{temp}' ({} partitions)",
            temp_meta.partitions.len()
        ));
        if spec.delete_temp_group {
            actions.push(format!("would delete group '{temp_group}'"));
        }
        for blocker in &blockers {
            actions.push(format!("would refuse now: {blocker}"));
        }
        finished(progress, "restore");
        return Ok(RestoreOutcome {
            name: spec.name.clone(),
            dry_run,
            exec: None,
            deleted,
            actions,
        });
    }
    if !blockers.is_empty() {
        finished(progress, "restore");
        return Err(Error::Broker(format!(
            "not restoring topic '{}': {}. Nothing was deleted; run restore again once that is done",
            spec.name,
            blockers.join("; ")
        )));
    }

    let exec = exec::operator_command(
        spec.exec.as_deref(),
        spec.exec_timeout,
        false,
        progress,
        &mut actions,
    )
    .await?;

    // Wait for the temporary group (bounded by --wait), then read once more right before
    // deleting, so nothing that arrived meanwhile is deleted unconsumed.
    let wait_started = Instant::now();
    let deadline = wait_started + spec.wait.unwrap_or_default();
    let mut lag = lag;
    loop {
        if total_lag(&lag) == 0 {
            let again =
                read_offsets(target, &temp_observer, &temp, &temp_meta.partitions, true).await?;
            if total_lag(&again) == 0 {
                break;
            }
            lag = again;
            continue;
        }
        if Instant::now() >= deadline {
            finished(progress, "restore");
            return Err(Error::Timeout(format!(
                "group '{temp_group}' still has {} message(s) of '{temp}' to consume after {}: {}; nothing was deleted. Add temporary consumers or raise --wait, then run restore again",
                total_lag(&lag),
                duration_text(spec.wait.unwrap_or_default()),
                list_lags(&temp, &lag)
            )));
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                finished(progress, "restore");
                return Err(Error::Cancelled);
            }
            _ = tokio::time::sleep(POLL) => {}
        }
        lag = read_offsets(target, &temp_observer, &temp, &temp_meta.partitions, true).await?;
    }
    if wait_started.elapsed() >= POLL {
        actions.push(format!(
            "group '{temp_group}' consumed every message of '{temp}' after {:.1}s",
            wait_started.elapsed().as_secs_f64()
        ));
    } else {
        actions.push(format!(
            "group '{temp_group}' consumed every message of '{temp}'"
        ));
    }

    let (_, temp_members) = group_members(target, &temp_observer, temp_group).await?;
    delete_topic(target, &temp).await?;
    await_topic(target, &observer, &temp, None).await?;
    actions.push(format!(
        "deleted temporary topic '{temp}' ({} partitions)",
        temp_meta.partitions.len()
    ));
    deleted.push(temp.clone());
    if !temp_members.is_empty() {
        notice(
            progress,
            Level::Warn,
            format!(
                "group '{temp_group}' still has {} member(s) ({}): stop the temporary consumers, their topic is gone",
                temp_members.len(),
                list_clients(&temp_members)
            ),
        );
    }
    if spec.delete_temp_group {
        match delete_group(target, temp_group).await {
            Ok(()) => {
                actions.push(format!("deleted group '{temp_group}'"));
                deleted.push(format!("group {temp_group}"));
            }
            Err(reason) => {
                let message = format!("did not delete group '{temp_group}': {reason}");
                notice(progress, Level::Warn, message.clone());
                actions.push(message);
            }
        }
    }
    let resume = read_offsets(target, &observer, &spec.name, &source.partitions, true).await?;
    actions.push(format!(
        "group '{group}' resumes topic '{}' at {} (lag {})",
        spec.name,
        format_offsets(&committed_map(&resume)),
        total_lag(&resume)
    ));
    finished(progress, "restore");
    Ok(RestoreOutcome {
        name: spec.name.clone(),
        dry_run,
        exec,
        deleted,
        actions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(low: i64, high: i64, committed: Option<i64>) -> PartitionOffsets {
        PartitionOffsets {
            partition: 0,
            low,
            high,
            committed,
        }
    }

    #[test]
    fn keys_parse_like_the_cli_documents_them() {
        assert_eq!(parse_key("routing-key").unwrap(), KeySource::RoutingKey);
        assert_eq!(
            parse_key("header:customer").unwrap(),
            KeySource::Header("customer".to_string())
        );
        for bad in ["message-id", "header:", "key", ""] {
            let error = parse_key(bad).unwrap_err();
            assert_eq!(error.exit_code(), crate::error::exit::USAGE, "{bad}");
        }
    }

    #[test]
    fn temp_topic_defaults_to_dot_drain() {
        assert_eq!(temp_topic("orders", None), "orders.drain");
        assert_eq!(temp_topic("orders", Some("tmp")), "tmp");
    }

    #[test]
    fn lag_counts_from_the_committed_offset_or_the_oldest_message() {
        assert_eq!(offsets(0, 100, Some(40)).lag(), 60);
        assert_eq!(
            offsets(10, 100, None).lag(),
            90,
            "never committed: whole partition"
        );
        assert_eq!(
            offsets(50, 100, Some(20)).lag(),
            50,
            "below the low watermark"
        );
        assert_eq!(offsets(0, 100, Some(100)).lag(), 0);
        assert_eq!(offsets(0, 0, None).lag(), 0);
    }

    #[test]
    fn factor_is_given_or_derived_and_must_match() {
        let mut spec: ForwardSpec =
            serde_json::from_value(serde_json::json!({ "name": "orders" })).unwrap();
        assert_eq!(fanout(&spec, "orders.drain", 12, 3).unwrap(), 4);
        assert_eq!(
            fanout(&spec, "orders.drain", 10, 3)
                .unwrap_err()
                .exit_code(),
            crate::error::exit::USAGE
        );
        spec.factor = Some(4);
        assert_eq!(fanout(&spec, "orders.drain", 12, 3).unwrap(), 4);
        spec.factor = Some(2);
        let error = fanout(&spec, "orders.drain", 12, 3).unwrap_err();
        assert!(error.to_string().contains("needs 6"), "{error}");
    }

    #[test]
    fn backlog_rates_and_eta_come_from_successive_readings() {
        let first = backlog("t".into(), Some(1000), (5000, Some(4000)), None);
        assert_eq!(
            (first.in_rate, first.out_rate, first.eta_secs),
            (None, None, None)
        );
        // 2 s later: 200 produced, 600 consumed -> net 200/s, 600 left -> 3 s.
        let next = backlog(
            "t".into(),
            Some(600),
            (5200, Some(4600)),
            Some((5000, Some(4000), 2.0)),
        );
        assert_eq!(next.in_rate, Some(100.0));
        assert_eq!(next.out_rate, Some(300.0));
        assert_eq!(next.eta_secs, Some(3.0));
        let growing = backlog(
            "t".into(),
            Some(700),
            (5400, Some(4700)),
            Some((5000, Some(4600), 2.0)),
        );
        assert_eq!(growing.eta_secs, None);
        let empty = backlog("t".into(), Some(0), (10, Some(10)), None);
        assert_eq!(empty.eta_secs, Some(0.0));
    }

    #[test]
    fn forwarders_are_recognised_by_their_member_id() {
        let forwarder = ClientRef {
            id: format!("{FORWARDER_CLIENT_ID}-0f1e2d"),
            host: None,
            who: None,
        };
        let app = ClientRef {
            id: "billing-7a7a".to_string(),
            host: Some("/10.0.0.7".to_string()),
            who: Some("billing".to_string()),
        };
        assert!(is_forwarder(&forwarder));
        assert!(!is_forwarder(&app));
    }
}
