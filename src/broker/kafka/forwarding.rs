//! The Kafka side of the forwarding loop: a consumer that reads the source topic under the
//! original consumer group (`KafkaSource`), and an idempotent producer that writes into the
//! temporary topic's partition blocks (`KafkaSink`).
//!
//! Consuming under the original group id is what makes the drain restorable: every offset the
//! forwarder commits is one the original consumers will not read again.

use super::client::{self, blocking, request_error};
use crate::broker::{Confirmation, KeySource, Position, Refusal, Sink, Source, ID_HEADER};
use crate::endpoint::KafkaTarget;
use crate::error::{Error, Result};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `client.id` of the forwarder's consumer and producer. Kafka prefixes member ids with it, so
/// stop-consumers, forward and restore can tell a forwarder from the original consumers.
pub const FORWARDER_CLIENT_ID: &str = "mqdrain-forward";
/// The forwarder's group session: a forwarder killed with SIGKILL leaves the group this long
/// after its last heartbeat (the broker's minimum is usually 6 s).
pub const FORWARDER_SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Acknowledged offsets are committed (asynchronously) at most this often while forwarding.
const COMMIT_EVERY: Duration = Duration::from_secs(1);
/// How long the forwarder may take to join the group and get its partitions.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
const JOIN_POLL: Duration = Duration::from_millis(200);
/// How long closing may wait for the producer's outstanding deliveries.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// Back-off when librdkafka's local produce queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(10);

/// Shared between the source and librdkafka's callbacks (rebalance, commit results).
pub struct ForwardContext {
    topic: String,
    /// Per partition, the next offset to consume: everything below it is confirmed by the sink.
    acked: Mutex<BTreeMap<i32, i64>>,
    /// Set once the group assigned partitions to the forwarder.
    assigned: AtomicBool,
    /// Set when the group took partitions away while forwarding: another member joined.
    revoked: AtomicBool,
    closing: AtomicBool,
    /// The last asynchronous commit failure; the final synchronous commit decides the outcome.
    commit_error: Mutex<Option<String>>,
}

impl ForwardContext {
    fn new(topic: &str) -> Self {
        ForwardContext {
            topic: topic.to_string(),
            acked: Mutex::new(BTreeMap::new()),
            assigned: AtomicBool::new(false),
            revoked: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            commit_error: Mutex::new(None),
        }
    }

    /// The acknowledged offsets as a commit list; `None` when nothing was acknowledged.
    fn commit_list(&self) -> Option<TopicPartitionList> {
        let acked = self.acked.lock().ok()?;
        if acked.is_empty() {
            return None;
        }
        let mut list = TopicPartitionList::new();
        for (&partition, &offset) in acked.iter() {
            // Only fails for Offset::Invalid-like values, which an acknowledged offset never is.
            list.add_partition_offset(&self.topic, partition, Offset::Offset(offset))
                .ok()?;
        }
        Some(list)
    }

    fn acked_offsets(&self) -> BTreeMap<i32, i64> {
        self.acked.lock().map(|map| map.clone()).unwrap_or_default()
    }
}

impl ClientContext for ForwardContext {}

impl ConsumerContext for ForwardContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(_) = rebalance {
            if self.closing.load(Ordering::SeqCst) || !self.assigned.load(Ordering::SeqCst) {
                return;
            }
            self.revoked.store(true, Ordering::SeqCst);
            // Commit what is confirmed before the partitions move (asynchronously: this runs
            // on the polling task). Whatever is not committed is forwarded again later.
            if let Some(list) = self.commit_list() {
                let _ = consumer.commit(&list, CommitMode::Async);
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            if list.count() > 0 {
                self.assigned.store(true, Ordering::SeqCst);
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(error) = result {
            if let Ok(mut slot) = self.commit_error.lock() {
                *slot = Some(error.to_string());
            }
        }
    }
}

type ForwardConsumer = StreamConsumer<ForwardContext>;

/// The source topic, consumed under the original group from its committed offsets.
pub struct KafkaSource {
    consumer: Arc<ForwardConsumer>,
    target: KafkaTarget,
    group: String,
    /// A message that arrived while waiting for the assignment.
    first: Option<OwnedMessage>,
    last_commit: Instant,
    uncommitted: bool,
}

impl KafkaSource {
    /// Joins `group`, subscribes to `topic` and waits until the group assigned partitions, so
    /// the loop's idle timer does not run during the join.
    pub async fn start(target: &KafkaTarget, topic: &str, group: &str) -> Result<Self> {
        let mut config = client::base_config(target, FORWARDER_CLIENT_ID);
        config
            // After -X settings on purpose: restore recognises a running forwarder by it.
            .set("client.id", FORWARDER_CLIENT_ID)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A partition the group never committed: start at its oldest message, so nothing
            // is skipped (at worst already-processed messages are forwarded again).
            .set("auto.offset.reset", "earliest")
            .set("allow.auto.create.topics", "false")
            .set(
                "session.timeout.ms",
                FORWARDER_SESSION_TIMEOUT.as_millis().to_string(),
            );
        let consumer: ForwardConsumer = config
            .create_with_context(ForwardContext::new(topic))
            .map_err(|error| client::client_setup_error(target, "forwarding consumer", &error))?;
        consumer.subscribe(&[topic]).map_err(|error| {
            request_error(target, &format!("subscribing to topic '{topic}'"), &error)
        })?;
        let mut source = KafkaSource {
            consumer: Arc::new(consumer),
            target: target.clone(),
            group: group.to_string(),
            first: None,
            last_commit: Instant::now(),
            uncommitted: false,
        };
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while !source.consumer.context().assigned.load(Ordering::SeqCst) {
            if Instant::now() >= deadline {
                let _ = source.close().await;
                return Err(Error::Timeout(format!(
                    "the forwarder did not get any partition of topic '{topic}' from group '{group}' within {}; check with `mqdrain inspect {topic} --group {group}` that no other member holds them, then run forward again",
                    humantime::format_duration(JOIN_TIMEOUT)
                )));
            }
            if let Some(message) = source.poll(JOIN_POLL).await? {
                source.first = Some(message);
                break;
            }
        }
        Ok(source)
    }

    async fn poll(&self, wait: Duration) -> Result<Option<OwnedMessage>> {
        match tokio::time::timeout(wait, self.consumer.recv()).await {
            Err(_) => Ok(None),
            Ok(Ok(message)) => Ok(Some(message.detach())),
            Ok(Err(error)) => self.consume_error(&error),
        }
    }

    fn consume_error(&self, error: &KafkaError) -> Result<Option<OwnedMessage>> {
        let topic = &self.consumer.context().topic;
        match error.rdkafka_error_code() {
            // librdkafka reconnects and resumes by itself.
            Some(
                RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::PartitionEOF,
            ) => Ok(None),
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
                Err(Error::Broker(format!(
                    "topic '{topic}' disappeared while forwarding ({error}); what was forwarded is committed for group '{}'. Check the topic, then run forward again",
                    self.group
                )))
            }
            _ => Err(request_error(
                &self.target,
                &format!("consuming topic '{topic}' as group '{}'", self.group),
                error,
            )),
        }
    }

    fn check_revoked(&self) -> Result<()> {
        if self.consumer.context().revoked.load(Ordering::SeqCst) {
            return Err(Error::Broker(format!(
                "another consumer joined group '{}' while forward was running and the group took partitions of topic '{}' away from the forwarder; the original consumers must stay stopped until restore. Forwarding stopped; what was confirmed is committed. Run stop-consumers, then forward again",
                self.group,
                self.consumer.context().topic
            )));
        }
        Ok(())
    }

    fn commit_async(&mut self) {
        if let Some(list) = self.consumer.context().commit_list() {
            // Failures surface in commit_callback; the final synchronous commit decides.
            let _ = self.consumer.commit(&list, CommitMode::Async);
        }
        self.last_commit = Instant::now();
        self.uncommitted = false;
    }
}

impl Source for KafkaSource {
    type Message = OwnedMessage;

    async fn receive(&mut self, wait: Duration) -> Result<Option<OwnedMessage>> {
        if let Some(message) = self.first.take() {
            return Ok(Some(message));
        }
        self.check_revoked()?;
        if self.uncommitted && self.last_commit.elapsed() >= COMMIT_EVERY {
            self.commit_async();
        }
        self.poll(wait).await
    }

    fn position(message: &OwnedMessage) -> Position {
        Position {
            lane: u32::try_from(message.partition()).unwrap_or_default(),
            seq: u64::try_from(message.offset()).unwrap_or_default(),
        }
    }

    fn key<'m>(message: &'m OwnedMessage, key: &KeySource) -> Option<&'m [u8]> {
        match key {
            KeySource::RoutingKey => message.key(),
            KeySource::Header(name) => message
                .headers()?
                .iter()
                .find(|header| header.key == name)
                .and_then(|header| header.value),
            // Kafka records have no message-id; the CLI refuses it before forwarding.
            KeySource::MessageId => None,
        }
    }

    fn identity(message: &OwnedMessage, header: Option<&str>) -> Option<Vec<u8>> {
        match header {
            Some(name) => message
                .headers()?
                .iter()
                .find(|found| found.key == name)
                .and_then(|found| found.value)
                .filter(|value| !value.is_empty())
                .map(<[u8]>::to_vec),
            // Where the record sits in the source is unique and survives every redelivery.
            None => Some(
                format!(
                    "{}-{}-{}",
                    message.topic(),
                    message.partition(),
                    message.offset()
                )
                .into_bytes(),
            ),
        }
    }

    async fn acknowledge(&mut self, position: Position) -> Result<()> {
        let partition = i32::try_from(position.lane)
            .map_err(|_| Error::Broker(format!("partition {} is out of range", position.lane)))?;
        let next = i64::try_from(position.seq.saturating_add(1))
            .map_err(|_| Error::Broker(format!("offset {} is out of range", position.seq)))?;
        if let Ok(mut acked) = self.consumer.context().acked.lock() {
            let entry = acked.entry(partition).or_insert(next);
            *entry = (*entry).max(next);
        }
        self.uncommitted = true;
        if self.last_commit.elapsed() >= COMMIT_EVERY {
            self.commit_async();
        }
        Ok(())
    }

    /// Kafka keeps every record whatever a group commits, so a skipped record stays in the
    /// topic; but offsets are one position per partition, so the group's commit passes it once a
    /// later record of its partition is acknowledged. A later run under the same group does not
    /// see it again (a run under a new group does). Holding the commit back instead would make
    /// every rerun re-read, and send again, all that was forwarded after it.
    async fn skip(&mut self, _message: &OwnedMessage) -> Result<()> {
        Ok(())
    }

    async fn close(self) -> Result<()> {
        self.consumer
            .context()
            .closing
            .store(true, Ordering::SeqCst);
        let KafkaSource {
            consumer,
            target,
            group,
            ..
        } = self;
        blocking(move || {
            let context = consumer.context();
            let committed = match context.commit_list() {
                Some(list) => consumer.commit(&list, CommitMode::Sync).map_err(|error| {
                    let earlier = context
                        .commit_error
                        .lock()
                        .ok()
                        .and_then(|slot| slot.clone())
                        .map(|text| format!(" (an earlier commit failed too: {text})"))
                        .unwrap_or_default();
                    Error::Broker(format!(
                        "could not commit group '{group}' at the forwarded offsets {} of topic '{}' on {}: {error}{earlier}. The forwarded messages are in the temporary topic; the next forward sends the uncommitted ones again (duplicates, not loss)",
                        format_offsets(&context.acked_offsets()),
                        context.topic,
                        target.bootstrap_servers
                    ))
                }),
                None => Ok(()),
            };
            // Dropping the consumer leaves the group (blocks until the broker answered).
            consumer.unsubscribe();
            drop(consumer);
            committed
        })
        .await
    }
}

pub fn format_offsets(offsets: &BTreeMap<i32, i64>) -> String {
    let parts: Vec<String> = offsets
        .iter()
        .map(|(partition, offset)| format!("[{partition}]={offset}"))
        .collect();
    if parts.is_empty() {
        "(none)".to_string()
    } else {
        parts.join(" ")
    }
}

/// The temporary topic: source partition `p` owns partitions `p*fanout .. p*fanout+fanout`.
pub struct KafkaSink {
    producer: FutureProducer,
    topic: String,
    fanout: usize,
    partitions: usize,
    bootstrap: String,
}

impl KafkaSink {
    pub fn new(
        target: &KafkaTarget,
        topic: &str,
        fanout: usize,
        partitions: usize,
    ) -> Result<Self> {
        let producer = client::confirming_producer(target, FORWARDER_CLIENT_ID, "forwarding", &[])?;
        Ok(KafkaSink {
            producer,
            topic: topic.to_string(),
            fanout,
            partitions,
            bootstrap: target.bootstrap_servers.clone(),
        })
    }

    fn partition(&self, lane: u32, index: usize) -> Option<i32> {
        block_partition(lane, index, self.fanout, self.partitions)
    }
}

/// Target `index` of source partition `lane`: partition `lane*fanout + index` of the temporary
/// topic, if it exists.
fn block_partition(lane: u32, index: usize, fanout: usize, partitions: usize) -> Option<i32> {
    let partition = (lane as usize).checked_mul(fanout)?.checked_add(index)?;
    (index < fanout && partition < partitions)
        .then(|| i32::try_from(partition).ok())
        .flatten()
}

pub(crate) fn retryable(error: &KafkaError) -> bool {
    !matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

impl Sink for KafkaSink {
    type Message = OwnedMessage;

    fn fanout(&self) -> usize {
        self.fanout
    }

    fn target_name(&self, lane: u32, index: usize) -> String {
        let partition = (lane as usize)
            .saturating_mul(self.fanout)
            .saturating_add(index);
        partition_name(&self.topic, partition)
    }

    async fn send(
        &mut self,
        lane: u32,
        index: usize,
        message: &OwnedMessage,
    ) -> Result<Confirmation> {
        self.produce(lane, index, message, None).await
    }

    async fn send_identified(
        &mut self,
        lane: u32,
        index: usize,
        message: &OwnedMessage,
        id: &[u8],
    ) -> Result<Confirmation> {
        self.produce(lane, index, message, Some(id)).await
    }

    async fn close(self) -> Result<()> {
        let producer = self.producer;
        let topic = self.topic;
        let bootstrap = self.bootstrap;
        blocking(move || {
            producer.flush(FLUSH_TIMEOUT).map_err(|error| {
                Error::Broker(format!(
                    "the producer could not deliver every message to temporary topic '{topic}' on {bootstrap} within {}: {error}; unconfirmed messages were not committed on the source and will be forwarded again",
                    humantime::format_duration(FLUSH_TIMEOUT)
                ))
            })
        })
        .await
    }
}

/// The record's headers, with `id` as the only `ID_HEADER` when given.
fn forwarded_headers(message: &OwnedMessage, id: Option<&[u8]>) -> Option<OwnedHeaders> {
    let Some(id) = id else {
        return message.headers().cloned();
    };
    let mut headers = OwnedHeaders::new();
    if let Some(original) = message.headers() {
        for header in original.iter().filter(|header| header.key != ID_HEADER) {
            headers = headers.insert(header);
        }
    }
    Some(headers.insert(Header {
        key: ID_HEADER,
        value: Some(id),
    }))
}

impl KafkaSink {
    async fn produce(
        &mut self,
        lane: u32,
        index: usize,
        message: &OwnedMessage,
        id: Option<&[u8]>,
    ) -> Result<Confirmation> {
        let partition = self.partition(lane, index).ok_or_else(|| {
            Error::Broker(format!(
                "source partition {lane} has no target partition {index} in temporary topic '{}' ({} partitions, {} per source partition); run expand with the factor used for forward",
                self.topic, self.partitions, self.fanout
            ))
        })?;
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).partition(partition);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        if let Some(headers) = forwarded_headers(message, id) {
            record = record.headers(headers);
        }
        if let Some(timestamp) = message.timestamp().to_millis() {
            record = record.timestamp(timestamp);
        }
        let delivery = loop {
            match self.producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                }
                Err((error, _)) => {
                    return Err(Error::Broker(format!(
                        "cannot hand a message to the producer for '{}' on {}: {error}; check the temporary topic and the -X settings, then run forward again",
                        partition_name(&self.topic, partition as usize),
                        self.bootstrap
                    )))
                }
            }
        };
        Ok(Box::pin(async move {
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((error, _))) => Err(if retryable(&error) {
                    Refusal::retry(error.to_string())
                } else {
                    Refusal::fatal(error.to_string())
                }),
                Err(_) => Err(Refusal::fatal(
                    "the producer shut down before the broker confirmed",
                )),
            }
        }))
    }
}

/// `orders.drain[3]`: how temporary partitions are named in outcomes and progress.
pub fn partition_name(topic: &str, partition: usize) -> String {
    format!("{topic}[{partition}]")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, Timestamp};

    fn message(key: Option<&[u8]>, headers: Option<OwnedHeaders>) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"payload".to_vec()),
            key.map(<[u8]>::to_vec),
            "orders".to_string(),
            Timestamp::CreateTime(1_700_000_000_000),
            2,
            41,
            headers,
        )
    }

    #[test]
    fn position_is_partition_and_offset() {
        let position = KafkaSource::position(&message(None, None));
        assert_eq!(position, Position { lane: 2, seq: 41 });
    }

    #[test]
    fn key_is_the_record_key_or_a_header() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "customer",
                value: Some("c-7"),
            })
            .insert(Header {
                key: "empty",
                value: None::<&str>,
            });
        let keyed = message(Some(b"k-1"), Some(headers));
        assert_eq!(
            KafkaSource::key(&keyed, &KeySource::RoutingKey),
            Some(&b"k-1"[..])
        );
        assert_eq!(
            KafkaSource::key(&keyed, &KeySource::Header("customer".into())),
            Some(&b"c-7"[..])
        );
        assert_eq!(
            KafkaSource::key(&keyed, &KeySource::Header("empty".into())),
            None
        );
        assert_eq!(
            KafkaSource::key(&keyed, &KeySource::Header("other".into())),
            None
        );
        assert_eq!(
            KafkaSource::key(&message(None, None), &KeySource::RoutingKey),
            None
        );
        assert_eq!(KafkaSource::key(&keyed, &KeySource::MessageId), None);
    }

    #[test]
    fn identity_is_where_the_record_sits_or_a_header() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "event-id",
                value: Some("e-9"),
            })
            .insert(Header {
                key: "blank",
                value: Some(""),
            });
        let record = message(None, Some(headers));
        assert_eq!(
            KafkaSource::identity(&record, None),
            Some(b"orders-2-41".to_vec())
        );
        assert_eq!(
            KafkaSource::identity(&record, Some("event-id")),
            Some(b"e-9".to_vec())
        );
        assert_eq!(KafkaSource::identity(&record, Some("blank")), None);
        assert_eq!(KafkaSource::identity(&record, Some("other")), None);
    }

    #[test]
    fn the_id_header_is_stamped_once() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: ID_HEADER,
                value: Some("old"),
            })
            .insert(Header {
                key: "keep",
                value: Some("k"),
            });
        let record = message(None, Some(headers));
        let stamped = forwarded_headers(&record, Some(b"orders-2-41")).expect("headers");
        let pairs: Vec<(&str, Option<&[u8]>)> = stamped
            .iter()
            .map(|header| (header.key, header.value))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("keep", Some(&b"k"[..])),
                (ID_HEADER, Some(&b"orders-2-41"[..]))
            ]
        );
        assert!(forwarded_headers(&message(None, None), None).is_none());
    }

    #[test]
    fn each_source_partition_owns_a_block_of_partitions() {
        assert_eq!(block_partition(0, 0, 4, 12), Some(0));
        assert_eq!(block_partition(1, 3, 4, 12), Some(7));
        assert_eq!(block_partition(2, 3, 4, 12), Some(11));
        assert_eq!(block_partition(2, 4, 4, 12), None, "index beyond the block");
        assert_eq!(block_partition(3, 0, 4, 12), None, "lane beyond the topic");
    }
}
