//! Watermarks and a group's committed offsets per partition, read off the async runtime.

use super::client::{blocking, request_error, REQUEST_TIMEOUT};
use crate::endpoint::KafkaTarget;
use crate::error::Result;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Arc;

/// Offsets of one partition, and of a group on it.
#[derive(Debug, Clone)]
pub struct PartitionOffsets {
    pub partition: i32,
    pub low: i64,
    pub high: i64,
    /// The group's committed offset; `None` when it never committed (or no group was asked).
    pub committed: Option<i64>,
}

impl PartitionOffsets {
    /// Where the group's next consumer starts: its committed offset, or the oldest message
    /// (the forwarder's `auto.offset.reset`; also a temporary group that never committed).
    pub fn consumed_up_to(&self) -> i64 {
        self.committed.unwrap_or(self.low).max(self.low)
    }

    pub fn lag(&self) -> u64 {
        u64::try_from(self.high - self.consumed_up_to()).unwrap_or(0)
    }
}

/// Watermarks of every partition and, with `with_group`, the committed offsets of the
/// observer's group.
pub async fn read_offsets(
    target: &KafkaTarget,
    observer: &Arc<BaseConsumer>,
    topic: &str,
    partitions: &[i32],
    with_group: bool,
) -> Result<Vec<PartitionOffsets>> {
    let consumer = Arc::clone(observer);
    let topic = topic.to_string();
    let partitions = partitions.to_vec();
    let target = target.clone();
    blocking(move || {
        let committed = if with_group {
            let mut list = TopicPartitionList::new();
            for &partition in &partitions {
                list.add_partition(&topic, partition);
            }
            Some(
                consumer
                    .committed_offsets(list, REQUEST_TIMEOUT)
                    .map_err(|error| {
                        request_error(
                            &target,
                            &format!("reading committed offsets on topic '{topic}'"),
                            &error,
                        )
                    })?,
            )
        } else {
            None
        };
        let mut offsets = Vec::with_capacity(partitions.len());
        for &partition in &partitions {
            let (low, high) = consumer
                .fetch_watermarks(&topic, partition, REQUEST_TIMEOUT)
                .map_err(|error| {
                    request_error(
                        &target,
                        &format!("reading the watermarks of '{topic}' partition {partition}"),
                        &error,
                    )
                })?;
            let committed = committed
                .as_ref()
                .and_then(|list| list.find_partition(&topic, partition))
                .and_then(|element| match element.offset() {
                    Offset::Offset(offset) if offset >= 0 => Some(offset),
                    _ => None,
                });
            offsets.push(PartitionOffsets {
                partition,
                low,
                high,
                committed,
            });
        }
        Ok(offsets)
    })
    .await
}
