//! Observing one Kafka topic and a consumer group over a sampling window: watermarks, offsets, lag.

use super::client::{self, blocking, request_error, REQUEST_TIMEOUT};
use super::offsets::read_offsets;
use crate::endpoint::KafkaTarget;
use crate::error::{Error, Result};
use crate::ops::estimate::{self, Sample};
use crate::ops::inspect::{GroupMember, InspectSpec, PartitionReport, TopicReport, TopicSettings};
use crate::progress::{Event, Level, Progress};
use rdkafka::admin::ResourceSpecifier;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Group id used for metadata reads when no group is named; it never commits.
const OBSERVER_GROUP: &str = "mqdrain-observer";

/// One reading of every partition.
struct Reading {
    at: Instant,
    partitions: Vec<PartitionReport>,
}

impl Reading {
    fn lag(&self) -> Option<u64> {
        self.partitions.iter().map(|p| p.lag).sum()
    }

    fn high_total(&self) -> i64 {
        self.partitions.iter().map(|p| p.high).sum()
    }

    fn committed_total(&self) -> Option<i64> {
        self.partitions.iter().map(|p| p.committed).sum()
    }
}

pub async fn observe_topic(
    target: &KafkaTarget,
    spec: &InspectSpec,
    progress: &Progress,
) -> Result<TopicReport> {
    progress.emit(Event::StepStarted {
        step: "inspect".into(),
        detail: format!(
            "topic '{}' on kafka://{}",
            spec.name, target.bootstrap_servers
        ),
    });
    let group = spec.group.clone();
    let consumer = Arc::new(client::observer(
        target,
        group.as_deref().unwrap_or(OBSERVER_GROUP),
    )?);
    let partitions = partition_ids(target, &consumer, &spec.name).await?;
    let mut notes = Vec::new();

    let (group_state, members) = match &group {
        Some(group) => {
            let (state, members) = describe_group(target, &consumer, group).await?;
            (Some(state), Some(members))
        }
        None => {
            notes.push("no --group given: lag, committed offsets and the drain estimate need the consumer group".to_string());
            (None, None)
        }
    };

    let started = Instant::now();
    let first =
        read_partitions(target, &consumer, &spec.name, &partitions, group.is_some()).await?;
    if let (Some(group), Some(members)) = (&group, &members) {
        let never_committed = first.partitions.iter().all(|p| p.committed.is_none());
        if never_committed && members.is_empty() {
            return Err(unknown_group(target, &consumer, group, &spec.name).await);
        }
    }
    let mut readings = vec![first];
    while group.is_some() && started.elapsed() < spec.sample {
        progress.emit(Event::Sampling {
            what: format!("lag of '{}'", spec.name),
            elapsed: started.elapsed(),
            total: spec.sample,
        });
        tokio::time::sleep(SAMPLE_INTERVAL.min(spec.sample.saturating_sub(started.elapsed())))
            .await;
        readings.push(read_partitions(target, &consumer, &spec.name, &partitions, true).await?);
    }

    let drain = group.as_ref().map(|_| drain_estimate(&readings));
    let last = readings.pop().unwrap_or(Reading {
        at: started,
        partitions: Vec::new(),
    });
    for partition in last
        .partitions
        .iter()
        .filter(|p| group.is_some() && p.committed.is_none())
    {
        notes.push(format!(
            "partition {} has no committed offset for the group: its consumers will start at their auto.offset.reset position, so its lag is unknown",
            partition.partition
        ));
    }
    let settings = topic_settings(target, &spec.name, &mut notes).await;
    for note in &notes {
        progress.emit(Event::Notice {
            level: Level::Info,
            message: note.clone(),
        });
    }
    progress.emit(Event::StepFinished {
        step: "inspect".into(),
    });
    Ok(TopicReport {
        name: spec.name.clone(),
        lag: group.as_ref().and_then(|_| last.lag()),
        group,
        partitions: last.partitions,
        group_state,
        members,
        settings,
        drain,
        notes,
        warnings: Vec::new(),
    })
}

fn drain_estimate(readings: &[Reading]) -> estimate::DrainEstimate {
    let Some(first) = readings.first() else {
        return estimate::estimate(&[], None, None);
    };
    let samples: Vec<Sample> = readings
        .iter()
        .filter_map(|reading| {
            reading.lag().map(|depth| Sample {
                at_secs: reading.at.duration_since(first.at).as_secs_f64(),
                depth,
            })
        })
        .collect();
    let (inflow, outflow) = match readings.last() {
        Some(last) if last.at > first.at => {
            let secs = last.at.duration_since(first.at).as_secs_f64();
            let inflow = (last.high_total() - first.high_total()) as f64 / secs;
            let outflow = match (last.committed_total(), first.committed_total()) {
                (Some(now), Some(before)) => Some((now - before) as f64 / secs),
                _ => None,
            };
            (Some(inflow), outflow)
        }
        _ => (None, None),
    };
    estimate::estimate(&samples, inflow, outflow)
}

pub async fn partition_ids(
    target: &KafkaTarget,
    consumer: &Arc<BaseConsumer>,
    topic: &str,
) -> Result<Vec<i32>> {
    let consumer = Arc::clone(consumer);
    let topic_name = topic.to_string();
    let target_copy = target.clone();
    blocking(move || {
        let metadata = consumer
            .fetch_metadata(Some(&topic_name), REQUEST_TIMEOUT)
            .map_err(|error| request_error(&target_copy, "reading topic metadata", &error))?;
        let topic_metadata = metadata
            .topics()
            .iter()
            .find(|candidate| candidate.name() == topic_name);
        match topic_metadata {
            Some(found) if found.error().is_none() && !found.partitions().is_empty() => {
                let mut ids: Vec<i32> = found.partitions().iter().map(|p| p.id()).collect();
                ids.sort_unstable();
                Ok(ids)
            }
            _ => Err(Error::NotFound {
                kind: "topic",
                name: topic_name,
                scope: format!(" on kafka://{}", target_copy.bootstrap_servers),
                hint: "check the name (topics are case-sensitive); `kcat -L` or `kafka-topics --list` lists them".to_string(),
            }),
        }
    })
    .await
}

async fn read_partitions(
    target: &KafkaTarget,
    consumer: &Arc<BaseConsumer>,
    topic: &str,
    partitions: &[i32],
    with_group: bool,
) -> Result<Reading> {
    let offsets = read_offsets(target, consumer, topic, partitions, with_group).await?;
    let partitions = offsets
        .into_iter()
        .map(|offsets| PartitionReport {
            partition: offsets.partition,
            low: offsets.low,
            high: offsets.high,
            committed: offsets.committed,
            // Unknown without a commit: the group starts wherever its auto.offset.reset says.
            lag: offsets.committed.map(|_| offsets.lag()),
        })
        .collect();
    Ok(Reading {
        at: Instant::now(),
        partitions,
    })
}

/// The group's state and members as the group coordinator reports them.
pub async fn describe_group(
    target: &KafkaTarget,
    consumer: &Arc<BaseConsumer>,
    group: &str,
) -> Result<(String, Vec<GroupMember>)> {
    let consumer = Arc::clone(consumer);
    let group = group.to_string();
    let target = target.clone();
    blocking(move || {
        let list = consumer
            .fetch_group_list(Some(&group), REQUEST_TIMEOUT)
            .map_err(|error| request_error(&target, "describing the consumer group", &error))?;
        Ok(list
            .groups()
            .iter()
            .find(|info| info.name() == group)
            .map(|info| {
                let members = info
                    .members()
                    .iter()
                    .map(|member| GroupMember {
                        member_id: member.id().to_string(),
                        client_id: Some(member.client_id().to_string()).filter(|id| !id.is_empty()),
                        host: Some(member.client_host().to_string())
                            .filter(|host| !host.is_empty()),
                    })
                    .collect();
                (info.state().to_string(), members)
            })
            .unwrap_or_else(|| ("Dead".to_string(), Vec::new())))
    })
    .await
}

pub(crate) async fn unknown_group(
    target: &KafkaTarget,
    consumer: &Arc<BaseConsumer>,
    group: &str,
    topic: &str,
) -> Error {
    let consumer = Arc::clone(consumer);
    let known = blocking(move || {
        Ok(consumer
            .fetch_group_list(None, REQUEST_TIMEOUT)
            .map(|list| {
                list.groups()
                    .iter()
                    .map(|info| info.name().to_string())
                    .filter(|name| name != OBSERVER_GROUP)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default())
    })
    .await
    .unwrap_or_default();
    let hint = if known.is_empty() {
        "no consumer groups exist on this cluster; check --group".to_string()
    } else {
        let mut shown: Vec<_> = known.into_iter().take(10).collect();
        shown.sort();
        format!(
            "check --group; groups on this cluster include: {}",
            shown.join(", ")
        )
    };
    Error::NotFound {
        kind: "consumer group",
        name: group.to_string(),
        scope: format!(
            " (no members and no committed offsets on topic '{topic}') on kafka://{}",
            target.bootstrap_servers
        ),
        hint,
    }
}

async fn topic_settings(
    target: &KafkaTarget,
    topic: &str,
    notes: &mut Vec<String>,
) -> TopicSettings {
    let admin = match client::admin(target) {
        Ok(admin) => admin,
        Err(error) => {
            notes.push(format!("could not read topic configs: {error}"));
            return TopicSettings::default();
        }
    };
    let resources = [ResourceSpecifier::Topic(topic)];
    let described = admin
        .describe_configs(&resources, &client::admin_options())
        .await;
    let resource = match described {
        Ok(mut results) if !results.is_empty() => results.remove(0),
        Ok(_) => {
            notes.push("the broker returned no topic configs".to_string());
            return TopicSettings::default();
        }
        Err(error) => {
            notes.push(format!("could not read topic configs: {error}"));
            return TopicSettings::default();
        }
    };
    match resource {
        Ok(resource) => {
            let entries = resource.entry_map();
            let value = |key: &str| entries.get(key).and_then(|entry| entry.value.clone());
            TopicSettings {
                retention_ms: value("retention.ms").and_then(|v| v.parse().ok()),
                retention_bytes: value("retention.bytes").and_then(|v| v.parse().ok()),
                cleanup_policy: value("cleanup.policy"),
            }
        }
        Err(code) => {
            notes.push(format!("could not read topic configs: {code}"));
            TopicSettings::default()
        }
    }
}
