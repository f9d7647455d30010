//! The Kafka drain cycle against a real Kafka-protocol broker: stop-consumers, expand, forward,
//! watch and restore, driven through the library. The test's own rdkafka clients play the
//! original application, its temporary consumers and a consumer that refuses to stop.

mod common;

use common::*;
use mqdrain::endpoint::{parse_target, Target};
use mqdrain::error::{exit, Error};
use mqdrain::ops::drain::{
    self, ExpandSpec, ForwardSpec, RestoreSpec, StopConsumersSpec, WatchSpec,
};
use mqdrain::ops::forward_loop::StopReason;
use mqdrain::ops::partition::key_hash_index;
use mqdrain::progress::{self, Event, Progress, ProgressSink};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

const CHILD_ENV: &str = "MQDRAIN_TEST_FORWARD_CHILD";

fn target() -> Target {
    parse_target(&kafka_url(), None, &[], None).expect("kafka URL parses")
}

fn spec<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("spec deserializes")
}

fn client_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", kafka_bootstrap())
        .set("log_level", "3");
    config
}

/// Keeps every event, so tests can check what the core reported.
#[derive(Default)]
struct Recorder(Mutex<Vec<Event>>);

impl ProgressSink for Recorder {
    fn emit(&self, event: Event) {
        if let Ok(mut events) = self.0.lock() {
            events.push(event);
        }
    }
}

/// One message as a consumer of the temporary topic saw it.
#[derive(Debug, Clone)]
struct Seen {
    partition: i32,
    offset: i64,
    id: String,
    key: Option<String>,
    seq: Option<u64>,
    timestamp: Option<i64>,
}

fn header<'a>(message: &'a impl Message, name: &str) -> Option<&'a [u8]> {
    message
        .headers()?
        .iter()
        .find(|header| header.key == name)
        .and_then(|header| header.value)
}

fn text(bytes: Option<&[u8]>) -> Option<String> {
    bytes.map(|bytes| String::from_utf8_lossy(bytes).into_owned())
}

fn base_timestamp() -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    now - 3_600_000
}

/// Produces `count` messages into `partition`: id `<partition>-<index>` in the value and in
/// header `id`, key from `key_of(index)`, header `seq` counting per key, timestamp
/// `base + index`. Returns the ids in offset order.
async fn produce_ids(
    topic: &str,
    partition: i32,
    count: usize,
    key_of: impl Fn(usize) -> String,
    base: i64,
) -> Vec<String> {
    let producer: FutureProducer = client_config()
        .set("enable.idempotence", "true")
        .set("linger.ms", "10")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let mut per_key: HashMap<String, u64> = HashMap::new();
    let mut ids = Vec::with_capacity(count);
    let mut deliveries = Vec::with_capacity(count);
    for index in 0..count {
        let id = format!("{partition}-{index}");
        let key = key_of(index);
        let seq = per_key.entry(key.clone()).or_default();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "seq",
                value: Some(seq.to_string().as_str()),
            });
        *seq += 1;
        let record = FutureRecord::to(topic)
            .partition(partition)
            .key(&key)
            .payload(&id)
            .headers(headers)
            .timestamp(base + index as i64);
        deliveries.push(
            producer
                .send_result(record)
                .map_err(|(error, _)| error)
                .expect("enqueue"),
        );
        ids.push(id);
    }
    for delivery in deliveries {
        delivery.await.expect("delivery").expect("delivered");
    }
    ids
}

fn watermarks(topic: &str, partitions: i32) -> Vec<(i64, i64)> {
    let consumer: BaseConsumer = client_config()
        .set("group.id", "test-observer")
        .create()
        .expect("consumer");
    (0..partitions)
        .map(|partition| {
            consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .expect("watermarks")
        })
        .collect()
}

fn committed(group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    let consumer: BaseConsumer = client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition);
    }
    let offsets = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .map(|partition| {
            match offsets
                .find_partition(topic, partition)
                .map(|element| element.offset())
            {
                Some(Offset::Offset(offset)) => Some(offset),
                _ => None,
            }
        })
        .collect()
}

fn topic_exists(topic: &str) -> bool {
    let consumer: BaseConsumer = client_config()
        .set("group.id", "test-observer")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    metadata
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
}

fn partition_count(topic: &str) -> usize {
    let consumer: BaseConsumer = client_config()
        .set("group.id", "test-observer")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len())
}

async fn topic_configs(topic: &str) -> BTreeMap<String, String> {
    let admin: AdminClient<DefaultClientContext> = client_config().create().expect("admin");
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .expect("describe configs");
    described
        .into_iter()
        .next()
        .expect("one resource")
        .expect("configs")
        .entries
        .into_iter()
        .filter(|entry| !entry.is_default)
        .filter_map(|entry| entry.value.map(|value| (entry.name, value)))
        .collect()
}

async fn group_member_count(group: &str) -> usize {
    let group = group.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config()
            .set("group.id", "test-observer")
            .create()
            .expect("consumer");
        consumer
            .fetch_group_list(Some(&group), Duration::from_secs(10))
            .map(|list| list.groups().iter().map(|g| g.members().len()).sum())
            .unwrap_or_default()
    })
    .await
    .expect("group list")
}

/// A consumer of somebody else's application: subscribed under `group`, recording every
/// message until stopped; with `commit` it auto-commits what it polled, without it is a stuck
/// consumer that never commits.
struct TestConsumer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl TestConsumer {
    fn start(topic: &str, group: &str) -> Self {
        Self::start_with(topic, group, true)
    }

    fn start_with(topic: &str, group: &str, commit: bool) -> Self {
        let consumer: StreamConsumer = client_config()
            .set("group.id", group)
            .set("enable.auto.commit", commit.to_string())
            .set("auto.commit.interval.ms", "200")
            .set("auto.offset.reset", "earliest")
            .set("client.id", "test-app")
            .create()
            .expect("consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let stop = Arc::clone(&stop);
            let seen = Arc::clone(&seen);
            async move {
                while !stop.load(Ordering::SeqCst) {
                    match tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await {
                        Ok(Ok(message)) => {
                            let record = Seen {
                                partition: message.partition(),
                                offset: message.offset(),
                                id: text(message.payload()).unwrap_or_default(),
                                key: text(message.key()),
                                seq: text(header(&message, "seq")).and_then(|s| s.parse().ok()),
                                timestamp: message.timestamp().to_millis(),
                            };
                            assert_eq!(
                                text(header(&message, "id")).as_deref(),
                                Some(record.id.as_str()),
                                "the id header travels with the message"
                            );
                            seen.lock().unwrap().push(record);
                        }
                        Ok(Err(error)) => panic!("test consumer: {error}"),
                        Err(_) => {}
                    }
                }
                // Dropping commits the last positions and leaves the group.
                tokio::task::spawn_blocking(move || drop(consumer))
                    .await
                    .expect("consumer closes");
            }
        });
        TestConsumer { stop, task, seen }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    async fn stop(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("test consumer task");
        Arc::try_unwrap(self.seen)
            .map(|seen| seen.into_inner().unwrap())
            .unwrap_or_default()
    }
}

/// Reads every message of `topic` once (no group commits).
async fn read_all(topic: &str, expected_at_least: usize) -> Vec<Seen> {
    let group = unique("reader");
    let consumer = TestConsumer::start(topic, &group);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = 0;
    let mut stable_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = consumer.count();
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
        if now >= expected_at_least && stable_since.elapsed() > Duration::from_secs(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "read only {now} of at least {expected_at_least} messages from {topic}"
        );
    }
    consumer.stop().await
}

fn forward_spec(topic: &str, group: &str, extra: serde_json::Value) -> ForwardSpec {
    let mut value = json!({ "name": topic, "group": group, "idle_timeout": "3s" });
    if let (Some(object), Some(extra)) = (value.as_object_mut(), extra.as_object()) {
        for (key, item) in extra {
            object.insert(key.clone(), item.clone());
        }
    }
    spec(value)
}

async fn expand_to(topic: &str, factor: usize) -> drain::ExpandOutcome {
    drain::expand(
        &target(),
        &spec::<ExpandSpec>(json!({ "name": topic, "factor": factor })),
        false,
        &progress::silent(),
    )
    .await
    .expect("expand")
}

// -------------------------------------------------------------------------------------------

/// The whole runbook on 100k messages: nothing lost, every source partition stays in its own
/// block of 4, the original group ends exactly at the forwarded end, the temporary topic goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_cycle_loses_nothing_and_restores_the_group_offsets() {
    let topic = unique("cycle");
    let group = unique("cycle-app");
    let temp_group = unique("cycle-temp");
    let target = target();
    kafka::create_topic(
        &topic,
        3,
        &[
            ("retention.ms", "86400000"),
            ("cleanup.policy", "delete"),
            ("max.message.bytes", "2000000"),
        ],
    )
    .await;
    let base = base_timestamp();
    let counts = [33_000, 33_500, 33_500];
    let mut expected: HashSet<String> = HashSet::new();
    let committed_before = [1_000_i64, 2_500, 0];
    let started = Instant::now();
    for (partition, &count) in counts.iter().enumerate() {
        let ids = produce_ids(
            &topic,
            partition as i32,
            count,
            |index| format!("k{}", index % 500),
            base,
        )
        .await;
        let skip = committed_before[partition] as usize;
        expected.extend(ids.into_iter().skip(skip));
    }
    println!(
        "produced 100000 messages in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    kafka::commit(&group, &topic, &committed_before);

    let stopped = drain::stop_consumers(
        &target,
        &spec::<StopConsumersSpec>(json!({ "name": topic, "group": group, "wait": "5s" })),
        false,
        &progress::silent(),
    )
    .await
    .expect("stop-consumers passes on an empty group");
    assert!(stopped.remaining.is_empty());

    let expanded = expand_to(&topic, 4).await;
    let temp = format!("{topic}.drain");
    assert_eq!(expanded.temporary, vec![temp.clone()]);
    assert_eq!(expanded.partitions, Some(12));
    assert!(!expanded.unchanged);
    assert_eq!(partition_count(&temp), 12);
    let configs = topic_configs(&temp).await;
    assert_eq!(
        configs.get("retention.ms").map(String::as_str),
        Some("86400000")
    );
    assert_eq!(
        configs.get("cleanup.policy").map(String::as_str),
        Some("delete")
    );
    assert_eq!(
        configs.get("max.message.bytes").map(String::as_str),
        Some("2000000")
    );
    assert!(expanded
        .copied_settings
        .contains(&("retention.ms".to_string(), "86400000".to_string())));

    // Forward, the temporary consumers and watch all run at once, as in an incident.
    let recorder = Arc::new(Recorder::default());
    let forward_progress: Progress = recorder.clone();
    let forwarding = tokio::spawn({
        let target = target.clone();
        let spec = forward_spec(&topic, &group, json!({}));
        async move {
            drain::forward(
                &target,
                &spec,
                false,
                &forward_progress,
                &CancellationToken::new(),
            )
            .await
        }
    });
    let temp_consumers = TestConsumer::start(&temp, &temp_group);
    let mut samples = Vec::new();
    let watched = drain::watch(
        &target,
        &spec::<WatchSpec>(json!({
            "name": topic, "group": group, "temp_group": temp_group,
            "until_drained": true, "timeout": "90s", "interval": "500ms"
        })),
        &(recorder.clone() as Progress),
        &CancellationToken::new(),
        &mut |sample| samples.push(sample.clone()),
    )
    .await
    .expect("watch sees the drain finish");
    assert!(watched.drained);
    assert!(samples.len() >= 2);
    let last = samples.last().expect("a sample");
    assert_eq!(last.source.depth, Some(0));
    assert_eq!(last.temporary.len(), 12);
    assert_eq!(last.temporary[3].name, format!("{temp}[3]"));
    assert!(last
        .temporary
        .iter()
        .all(|backlog| backlog.depth == Some(0)));
    assert!(
        samples.iter().any(|sample| sample.source.depth > Some(0)),
        "watch saw the backlog before it drained"
    );

    let forwarded = forwarding
        .await
        .expect("forward task")
        .expect("forward succeeds");
    let result = forwarded.result.expect("a loop outcome");
    println!(
        "forwarded {} messages at {:.0} msg/s ({:.1}s including the idle stop)",
        result.forwarded, result.rate, result.elapsed_secs
    );
    assert_eq!(result.stopped_by, StopReason::Idle);
    assert_eq!(result.forwarded, expected.len() as u64);
    assert_eq!(result.returned_to_source, 0);
    assert_eq!(forwarded.targets.len(), 12);
    let ends: Vec<i64> = watermarks(&topic, 3)
        .iter()
        .map(|(_, high)| *high)
        .collect();
    assert_eq!(
        committed(&group, &topic, 3),
        ends.iter().map(|&end| Some(end)).collect::<Vec<_>>(),
        "the original group is committed exactly at the end of what was forwarded"
    );
    {
        let events = recorder.0.lock().unwrap();
        assert!(events
            .iter()
            .any(|event| matches!(event, Event::Forwarded { .. })));
        assert!(events.iter().any(
            |event| matches!(event, Event::Backlog { name, .. } if *name == format!("{temp}[11]"))
        ));
    }

    let seen = temp_consumers.stop().await;
    let mut ids = HashSet::new();
    for message in &seen {
        let source_partition: i32 = message
            .id
            .split('-')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("id names its source partition");
        assert!(
            (source_partition * 4..source_partition * 4 + 4).contains(&message.partition),
            "{} from source partition {source_partition} landed in {temp}[{}]",
            message.id,
            message.partition
        );
        assert!(message.key.as_deref().is_some_and(|k| k.starts_with('k')));
        let index: i64 = message.id.split('-').nth(1).unwrap().parse().unwrap();
        assert_eq!(message.timestamp, Some(base + index), "timestamp preserved");
        ids.insert(message.id.clone());
    }
    let missing = expected.difference(&ids).count();
    assert_eq!(missing, 0, "{missing} message(s) lost");
    assert_eq!(ids.len(), expected.len(), "nothing but the backlog arrived");
    println!(
        "temporary consumers saw {} messages ({} duplicates)",
        seen.len(),
        seen.len() - ids.len()
    );

    let restored = drain::restore(
        &target,
        &spec::<RestoreSpec>(json!({
            "name": topic, "group": group, "temp_group": temp_group, "delete_temp_group": true
        })),
        false,
        &progress::silent(),
        &CancellationToken::new(),
    )
    .await
    .expect("restore");
    assert!(restored.deleted.contains(&temp), "{restored:?}");
    assert!(!topic_exists(&temp), "the temporary topic is gone");
    assert_eq!(
        committed(&group, &topic, 3),
        ends.iter().map(|&end| Some(end)).collect::<Vec<_>>(),
        "restore leaves the original group where forward put it"
    );
}

/// Key-hash: every key lands in exactly one temporary partition, `p*N + murmur2(key) % N`, in
/// its original order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_hash_keeps_each_key_in_one_partition_in_order() {
    let topic = unique("keyhash");
    let group = unique("keyhash-app");
    let target = target();
    kafka::create_topic(&topic, 2, &[]).await;
    let base = base_timestamp();
    let mut total = 0;
    for partition in 0..2 {
        // Keys live in one source partition each, as a keyed producer would put them.
        let ids = produce_ids(
            &topic,
            partition,
            3_000,
            |index| format!("customer-{partition}-{}", index % 37),
            base,
        )
        .await;
        total += ids.len();
    }
    kafka::commit(&group, &topic, &[0, 0]);
    expand_to(&topic, 3).await;
    let outcome = drain::forward(
        &target,
        &forward_spec(
            &topic,
            &group,
            json!({ "strategy": "key-hash", "key": "routing-key", "idle_timeout": "2s" }),
        ),
        false,
        &progress::silent(),
        &CancellationToken::new(),
    )
    .await
    .expect("forward");
    let result = outcome.result.expect("loop outcome");
    assert_eq!(result.forwarded, total as u64);
    assert_eq!(result.unkeyed, 0);

    let seen = read_all(&format!("{topic}.drain"), total).await;
    assert_eq!(seen.len(), total);
    let mut by_key: BTreeMap<String, Vec<&Seen>> = BTreeMap::new();
    for message in &seen {
        by_key
            .entry(message.key.clone().expect("keyed"))
            .or_default()
            .push(message);
    }
    assert_eq!(by_key.len(), 2 * 37);
    for (key, messages) in by_key.iter_mut() {
        let source_partition: i32 = key.split('-').nth(1).unwrap().parse().unwrap();
        let expected = source_partition * 3 + key_hash_index(key.as_bytes(), 3) as i32;
        assert!(
            messages.iter().all(|m| m.partition == expected),
            "key {key} expected only in partition {expected}"
        );
        messages.sort_by_key(|m| m.offset);
        let seqs: Vec<u64> = messages.iter().map(|m| m.seq.expect("seq")).collect();
        let in_order: Vec<u64> = (0..seqs.len() as u64).collect();
        assert_eq!(seqs, in_order, "key {key} kept its order");
    }
}

/// The child half of `killed_forwarder_loses_nothing_on_rerun`: a forwarder the parent kills
/// with SIGKILL. Ignored unless the parent runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by killed_forwarder_loses_nothing_on_rerun as a child process"]
async fn forward_child_process() {
    let Ok(setting) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (topic, group) = setting.split_once(' ').expect("topic and group");
    let spec = forward_spec(
        topic,
        group,
        json!({ "rate_limit": 4000.0, "idle_timeout": "30s" }),
    );
    let outcome = drain::forward(
        &target(),
        &spec,
        false,
        &progress::silent(),
        &CancellationToken::new(),
    )
    .await;
    panic!("the child forwarder should have been killed, but ended with {outcome:?}");
}

/// SIGKILL in the middle of a forward (no commit, no flush, no leave), then a rerun: no id is
/// lost, and the duplicates are exactly what was forwarded but not yet committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_forwarder_loses_nothing_on_rerun() {
    let topic = unique("kill");
    let group = unique("kill-app");
    let target = target();
    kafka::create_topic(&topic, 2, &[]).await;
    let mut expected = HashSet::new();
    for partition in 0..2 {
        expected.extend(
            produce_ids(
                &topic,
                partition,
                15_000,
                |index| format!("k{index}"),
                base_timestamp(),
            )
            .await,
        );
    }
    kafka::commit(&group, &topic, &[0, 0]);
    expand_to(&topic, 2).await;
    let temp = format!("{topic}.drain");

    let mut child = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "forward_child_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{topic} {group}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("child forwarder starts");
    let observed = eventually(Duration::from_secs(60), "the child to commit 8000", || {
        let group = group.clone();
        let topic = topic.clone();
        async move {
            let offsets = tokio::task::spawn_blocking(move || committed(&group, &topic, 2))
                .await
                .map_err(|e| e.to_string())?;
            let sum: i64 = offsets.iter().flatten().sum();
            if sum >= 8_000 {
                Ok(sum)
            } else {
                Err(format!("committed {sum}"))
            }
        }
    })
    .await;
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("child reaped");
    let committed_at_kill: i64 = committed(&group, &topic, 2).iter().flatten().sum();
    let temp_at_kill: i64 = watermarks(&temp, 4)
        .iter()
        .map(|(low, high)| high - low)
        .sum();
    let uncommitted = temp_at_kill - committed_at_kill;
    println!(
        "killed the forwarder at {observed}+ committed: {committed_at_kill} committed, {temp_at_kill} in the temporary topic ({uncommitted} forwarded but not committed)"
    );
    assert!(committed_at_kill < 30_000, "killed before the end");
    assert!(
        group_member_count(&group).await > 0,
        "the killed forwarder is still a member until its session expires"
    );
    let error = drain::restore(
        &target,
        &spec::<RestoreSpec>(
            json!({ "name": topic, "group": group, "temp_group": unique("kill-temp") }),
        ),
        false,
        &progress::silent(),
        &CancellationToken::new(),
    )
    .await
    .expect_err("restore refuses while the forwarder is a member");
    assert!(
        error.to_string().contains("forwarder is still a member"),
        "{error}"
    );

    let recorder = Arc::new(Recorder::default());
    let started = Instant::now();
    let rerun = drain::forward(
        &target,
        &forward_spec(&topic, &group, json!({ "idle_timeout": "2s" })),
        false,
        &(recorder.clone() as Progress),
        &CancellationToken::new(),
    )
    .await
    .expect("the rerun waits for the dead member, then forwards the rest");
    println!(
        "rerun forwarded {} in {:.1}s (including the wait for the dead member)",
        rerun.result.as_ref().map_or(0, |r| r.forwarded),
        started.elapsed().as_secs_f64()
    );
    assert!(recorder.0.lock().unwrap().iter().any(|event| matches!(
        event,
        Event::Notice { message, .. } if message.contains("forwarder member")
    )));
    let ends: Vec<Option<i64>> = watermarks(&topic, 2)
        .iter()
        .map(|(_, high)| Some(*high))
        .collect();
    assert_eq!(committed(&group, &topic, 2), ends);

    let seen = read_all(&temp, expected.len()).await;
    let ids: HashSet<String> = seen.iter().map(|m| m.id.clone()).collect();
    let lost = expected.difference(&ids).count();
    let duplicates = seen.len() - ids.len();
    println!("after kill -9 and rerun: {lost} lost, {duplicates} duplicates");
    assert_eq!(lost, 0, "no id lost");
    assert_eq!(
        duplicates as i64, uncommitted,
        "exactly the forwarded-but-uncommitted messages are duplicated"
    );
    // At 4000 msg/s with a commit every second and a window of 1000.
    assert!(
        duplicates <= 4_000 + 2_000,
        "duplicates bounded: {duplicates}"
    );
}

/// Forward and stop-consumers refuse while a consumer of the original group is running;
/// restore refuses (or times out waiting) while the temporary group still has lag, and
/// succeeds (and then is a no-op) once it is consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_while_consumers_run_or_lag_remains() {
    let topic = unique("refuse");
    let group = unique("refuse-app");
    let temp_group = unique("refuse-temp");
    let target = target();
    kafka::create_topic(&topic, 2, &[]).await;
    for partition in 0..2 {
        produce_ids(
            &topic,
            partition,
            500,
            |i| format!("k{i}"),
            base_timestamp(),
        )
        .await;
    }
    kafka::commit(&group, &topic, &[100, 100]);
    expand_to(&topic, 2).await;
    let temp = format!("{topic}.drain");

    let app = TestConsumer::start_with(&topic, &group, false);
    eventually(Duration::from_secs(20), "the app to join", || {
        let group = group.clone();
        async move {
            if group_member_count(&group).await > 0 {
                Ok(())
            } else {
                Err("no member yet".to_string())
            }
        }
    })
    .await;

    let error = drain::forward(
        &target,
        &forward_spec(&topic, &group, json!({})),
        false,
        &progress::silent(),
        &CancellationToken::new(),
    )
    .await
    .expect_err("forward refuses while the group has a member");
    assert!(matches!(error, Error::Broker(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("test-app"), "names the member: {message}");
    assert!(
        message.contains("stop-consumers"),
        "says what to do: {message}"
    );

    let error = drain::stop_consumers(
        &target,
        &spec::<StopConsumersSpec>(json!({ "name": topic, "group": group, "wait": "1s" })),
        false,
        &progress::silent(),
    )
    .await
    .expect_err("stop-consumers fails while the member stays");
    assert_eq!(error.exit_code(), exit::FAILED);
    assert!(error.to_string().contains("test-app"), "{error}");

    let dry = drain::stop_consumers(
        &target,
        &spec::<StopConsumersSpec>(json!({
            "name": topic, "group": group, "exec": "touch /nonexistent-dir/never", "wait": "1s"
        })),
        true,
        &progress::silent(),
    )
    .await
    .expect("dry run reports");
    assert_eq!(dry.remaining.len(), 1);
    assert!(dry.actions[0].starts_with("would run"), "{:?}", dry.actions);

    let dry_forward = drain::forward(
        &target,
        &forward_spec(&topic, &group, json!({})),
        true,
        &progress::silent(),
        &CancellationToken::new(),
    )
    .await
    .expect("a dry run reports instead of refusing");
    assert!(dry_forward.result.is_none());
    assert!(
        dry_forward
            .actions
            .iter()
            .any(|action| action.starts_with("would refuse now")),
        "{:?}",
        dry_forward.actions
    );

    // The operator's stop command runs first; stop-consumers then waits for the group to empty.
    let flag = std::env::temp_dir().join(unique("stop-flag"));
    let stopper = tokio::spawn({
        let flag = flag.clone();
        async move {
            while !flag.exists() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            app.stop().await;
        }
    });
    let stopped = drain::stop_consumers(
        &target,
        &spec::<StopConsumersSpec>(json!({
            "name": topic, "group": group, "exec": format!("touch '{}'", flag.display()), "wait": "20s"
        })),
        false,
        &progress::silent(),
    )
    .await
    .expect("stop-consumers runs the command and sees the group empty");
    stopper.await.expect("app stopped");
    let _ = std::fs::remove_file(&flag);
    assert!(stopped.remaining.is_empty());
    assert_eq!(
        stopped.exec.as_ref().and_then(|exec| exec.exit_code),
        Some(0)
    );
    assert_eq!(group_member_count(&group).await, 0);

    let forwarded = drain::forward(
        &target,
        &forward_spec(&topic, &group, json!({ "idle_timeout": "1s" })),
        false,
        &progress::silent(),
        &CancellationToken::new(),
    )
    .await
    .expect("forward once the app is gone");
    let forwarded = forwarded.result.expect("loop outcome").forwarded;
    assert_eq!(forwarded, 800, "the stuck app committed nothing");

    let restore_spec = |wait: Option<&str>| -> RestoreSpec {
        let mut value = json!({ "name": topic, "group": group, "temp_group": temp_group });
        if let Some(wait) = wait {
            value["wait"] = json!(wait);
        }
        spec(value)
    };
    let error = drain::restore(
        &target,
        &restore_spec(None),
        false,
        &progress::silent(),
        &CancellationToken::new(),
    )
    .await
    .expect_err("restore refuses with lag on the temporary topic");
    assert!(matches!(error, Error::Broker(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(&format!("{temp}[0] lag")), "{message}");
    assert!(message.contains(&temp_group), "{message}");
    assert!(topic_exists(&temp));

    let error = drain::restore(
        &target,
        &restore_spec(Some("1s")),
        false,
        &progress::silent(),
        &CancellationToken::new(),
    )
    .await
    .expect_err("restore times out waiting");
    assert_eq!(error.exit_code(), exit::TIMEOUT, "{error}");
    assert!(topic_exists(&temp));

    let error = drain::watch(
        &target,
        &spec::<WatchSpec>(json!({
            "name": topic, "group": group, "temp_group": temp_group,
            "until_drained": true, "timeout": "1s", "interval": "300ms"
        })),
        &progress::silent(),
        &CancellationToken::new(),
        &mut |_| {},
    )
    .await
    .expect_err("watch times out with lag left");
    assert_eq!(error.exit_code(), exit::TIMEOUT);

    let cancelled = CancellationToken::new();
    cancelled.cancel();
    let error = drain::watch(
        &target,
        &spec::<WatchSpec>(json!({ "name": topic, "group": group, "temp_group": temp_group })),
        &progress::silent(),
        &cancelled,
        &mut |_| {},
    )
    .await
    .expect_err("a cancelled watch stops");
    assert!(matches!(error, Error::Cancelled), "{error:?}");

    let temp_consumers = TestConsumer::start(&temp, &temp_group);
    let restored = drain::restore(
        &target,
        &restore_spec(Some("30s")),
        false,
        &progress::silent(),
        &CancellationToken::new(),
    )
    .await
    .expect("restore once the temporary group caught up");
    assert_eq!(temp_consumers.stop().await.len(), forwarded as usize);
    assert_eq!(restored.deleted, vec![temp.clone()]);
    assert!(!topic_exists(&temp));

    let again = drain::restore(
        &target,
        &restore_spec(None),
        false,
        &progress::silent(),
        &CancellationToken::new(),
    )
    .await
    .expect("restore again is a no-op");
    assert!(again.deleted.is_empty());
    assert!(again.actions[0].contains("nothing to restore"), "{again:?}");
}

/// Expand: dry run changes nothing, a rerun is a no-op, another factor needs --force, and
/// --force never deletes a temporary topic that holds unconsumed messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expand_is_idempotent_and_careful() {
    let topic = unique("expand");
    let target = target();
    kafka::create_topic(
        &topic,
        2,
        &[("retention.ms", "7200000"), ("min.insync.replicas", "3")],
    )
    .await;
    let temp = format!("{topic}.drain");
    let expand = |factor: usize, force: bool, dry_run: bool| {
        let target = target.clone();
        let topic = topic.clone();
        async move {
            drain::expand(
                &target,
                &spec::<ExpandSpec>(json!({ "name": topic, "factor": factor, "force": force })),
                dry_run,
                &progress::silent(),
            )
            .await
        }
    };

    let dry = expand(3, false, true).await.expect("dry run");
    assert!(dry.dry_run);
    assert!(
        dry.actions[0].starts_with("would create"),
        "{:?}",
        dry.actions
    );
    assert!(dry
        .copied_settings
        .contains(&("retention.ms".to_string(), "7200000".to_string())));
    assert!(!topic_exists(&temp), "dry run created nothing");

    let created = expand(3, false, false).await.expect("expand");
    assert_eq!(created.partitions, Some(6));
    assert!(!created.unchanged);
    assert_eq!(partition_count(&temp), 6);
    // One broker: replication factor 1, so min.insync.replicas 3 could never be met.
    assert!(created
        .copied_settings
        .contains(&("min.insync.replicas".to_string(), "1".to_string())));
    assert!(created
        .dropped_settings
        .iter()
        .any(|note| note.starts_with("min.insync.replicas=3")));

    let rerun = expand(3, false, false).await.expect("rerun");
    assert!(rerun.unchanged);
    assert_eq!(partition_count(&temp), 6);

    let error = expand(2, false, false).await.expect_err("another factor");
    assert_eq!(error.exit_code(), exit::USAGE, "{error}");
    assert!(error.to_string().contains("--factor 3"), "{error}");

    let dry_force = expand(2, true, true).await.expect("dry run with force");
    assert!(
        dry_force.actions[0].starts_with("would delete"),
        "{:?}",
        dry_force.actions
    );
    assert_eq!(partition_count(&temp), 6, "dry run deleted nothing");

    let forced = expand(2, true, false)
        .await
        .expect("force on an empty topic");
    assert_eq!(forced.partitions, Some(4));
    assert_eq!(partition_count(&temp), 4);

    // One unconsumed message makes the temporary topic precious.
    produce_ids(&temp, 1, 1, |_| "k".to_string(), base_timestamp()).await;
    let error = expand(3, true, false)
        .await
        .expect_err("force refuses with unconsumed messages");
    assert_eq!(error.exit_code(), exit::FAILED, "{error}");
    assert!(error.to_string().contains("never consumed"), "{error}");
    assert_eq!(partition_count(&temp), 4);

    // Once a group consumed it, --force may replace it.
    let reader = unique("expand-reader");
    kafka::commit(&reader, &temp, &[0, 1, 0, 0]);
    let replaced = expand(3, true, false)
        .await
        .expect("force once everything was consumed");
    assert_eq!(replaced.partitions, Some(6));
    assert!(
        replaced.actions[0].contains(&reader),
        "{:?}",
        replaced.actions
    );
    assert_eq!(partition_count(&temp), 6);
}

/// Ctrl-C in the middle: the forwarder stops, commits exactly what was confirmed, and a rerun
/// forwards the rest without a single duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_forward_commits_what_it_confirmed() {
    let topic = unique("cancel");
    let group = unique("cancel-app");
    let target = target();
    kafka::create_topic(&topic, 2, &[]).await;
    let mut expected = HashSet::new();
    for partition in 0..2 {
        expected.extend(
            produce_ids(
                &topic,
                partition,
                3_000,
                |i| format!("k{i}"),
                base_timestamp(),
            )
            .await,
        );
    }
    kafka::commit(&group, &topic, &[0, 0]);
    expand_to(&topic, 2).await;
    let temp = format!("{topic}.drain");

    let cancel = CancellationToken::new();
    let forwarding = tokio::spawn({
        let target = target.clone();
        let spec = forward_spec(&topic, &group, json!({ "rate_limit": 2000.0 }));
        let cancel = cancel.clone();
        async move { drain::forward(&target, &spec, false, &progress::silent(), &cancel).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cancel.cancel();
    let first = forwarding
        .await
        .expect("forward task")
        .expect("a cancelled forward ends cleanly")
        .result
        .expect("loop outcome");
    assert_eq!(first.stopped_by, StopReason::Signal);
    assert!(first.forwarded > 0 && first.forwarded < 6_000, "{first:?}");
    let committed_sum: i64 = committed(&group, &topic, 2).iter().flatten().sum();
    assert_eq!(
        committed_sum, first.forwarded as i64,
        "the commit covers exactly what was confirmed"
    );
    assert_eq!(group_member_count(&group).await, 0, "the forwarder left");

    let second = drain::forward(
        &target,
        &forward_spec(&topic, &group, json!({ "idle_timeout": "1s" })),
        false,
        &progress::silent(),
        &CancellationToken::new(),
    )
    .await
    .expect("rerun")
    .result
    .expect("loop outcome");
    assert_eq!(first.forwarded + second.forwarded, 6_000);
    let seen = read_all(&temp, expected.len()).await;
    let ids: HashSet<String> = seen.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids, expected);
    assert_eq!(
        seen.len(),
        expected.len(),
        "no duplicates after a graceful stop"
    );
}

/// An original consumer restarted by mistake while forwarding: the forwarder notices the
/// rebalance, stops with an error naming the group, and nothing it committed is missing from
/// the temporary topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_stops_when_another_consumer_joins() {
    let topic = unique("join");
    let group = unique("join-app");
    let target = target();
    kafka::create_topic(&topic, 2, &[]).await;
    let mut ids_by_partition = Vec::new();
    for partition in 0..2 {
        ids_by_partition.push(
            produce_ids(
                &topic,
                partition,
                4_000,
                |i| format!("k{i}"),
                base_timestamp(),
            )
            .await,
        );
    }
    kafka::commit(&group, &topic, &[0, 0]);
    expand_to(&topic, 2).await;
    let temp = format!("{topic}.drain");

    let forwarding = tokio::spawn({
        let target = target.clone();
        let spec = forward_spec(&topic, &group, json!({ "rate_limit": 2000.0 }));
        async move {
            drain::forward(
                &target,
                &spec,
                false,
                &progress::silent(),
                &CancellationToken::new(),
            )
            .await
        }
    });
    eventually(Duration::from_secs(30), "the forwarder to commit", || {
        let group = group.clone();
        let topic = topic.clone();
        async move {
            let sum: i64 = tokio::task::spawn_blocking(move || committed(&group, &topic, 2))
                .await
                .map_err(|e| e.to_string())?
                .iter()
                .flatten()
                .sum();
            if sum > 500 {
                Ok(())
            } else {
                Err(format!("committed {sum}"))
            }
        }
    })
    .await;
    let app = TestConsumer::start_with(&topic, &group, false);
    let error = tokio::time::timeout(Duration::from_secs(30), forwarding)
        .await
        .expect("forward stops within 30s")
        .expect("forward task")
        .expect_err("forward stops when another member joins");
    app.stop().await;
    assert!(matches!(error, Error::Broker(_)), "{error:?}");
    assert!(
        error.to_string().contains("another consumer joined group"),
        "{error}"
    );

    let committed_now = committed(&group, &topic, 2);
    let seen = read_all(&temp, 1).await;
    let in_temp: HashSet<String> = seen.iter().map(|m| m.id.clone()).collect();
    for (partition, ids) in ids_by_partition.iter().enumerate() {
        let upto = committed_now[partition].unwrap_or_default() as usize;
        let missing = ids[..upto.min(ids.len())]
            .iter()
            .filter(|id| !in_temp.contains(*id))
            .count();
        assert_eq!(
            missing, 0,
            "partition {partition}: committed {upto}, but {missing} of those are not in {temp}"
        );
    }
}
