//! `forward --dedup` against real RabbitMQ, Kafka and Redis: producer duplicates, a forwarder
//! killed with SIGKILL and rerun, and Redis unreachable (with and without `--dedup-optional`).

mod common;

use common::*;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::process::Stdio;
use std::time::Duration;

const QUIET: Duration = Duration::from_secs(2);
const ID_HEADER: &str = "x-mqdrain-id";

async fn run(url: &str, args: &[&str]) -> std::process::Output {
    let mut full = vec!["--url", url, "--output", "json"];
    full.extend_from_slice(args);
    mqdrain(&full).await
}

async fn run_ok(url: &str, args: &[&str]) -> Value {
    let output = run(url, args).await;
    assert!(
        output.status.success(),
        "mqdrain {args:?} failed ({:?}): {}",
        output.status.code(),
        stderr(&output)
    );
    stdout_json(&output)
}

/// Publishes one persistent message per entry, with that message-id (or none).
async fn publish_ids(queue: &str, ids: &[Option<String>]) {
    let connection = amqp_connection("test producer").await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for (index, id) in ids.iter().enumerate() {
        let mut properties = BasicProperties::default().with_delivery_mode(2);
        if let Some(id) = id {
            properties = properties.with_message_id(id.as_str().into());
        }
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    format!("payload {index}").as_bytes(),
                    properties,
                )
                .await
                .unwrap(),
        );
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack());
    }
    let _ = connection.close(200, "published".into()).await;
}

async fn declare(queue: &str) {
    let connection = amqp_connection("test setup").await;
    let channel = connection.create_channel().await.unwrap();
    declare_queue(&channel, queue, &[]).await;
    let _ = connection.close(200, "done".into()).await;
}

async fn delete_queues(names: &[String]) {
    let connection = amqp_connection("test cleanup").await;
    for name in names {
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let _ = connection.close(200, "bye".into()).await;
}

fn header_text(delivery: &lapin::message::Delivery, name: &str) -> Option<String> {
    match delivery.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(text) => Some(text.to_string()),
        _ => None,
    }
}

/// Every delivery of the temporary queues: (message-id, x-mqdrain-id header).
async fn drain_temps(temps: &[String]) -> Vec<(String, Option<String>)> {
    let connection = amqp_connection("test temporary consumers").await;
    let mut seen = Vec::new();
    for temp in temps {
        for delivery in consume_all(&connection, temp, QUIET).await {
            seen.push((message_id(&delivery), header_text(&delivery, ID_HEADER)));
        }
    }
    let _ = connection.close(200, "done".into()).await;
    seen
}

fn counts(ids: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for id in ids {
        *counts.entry(id).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn a_producer_duplicate_is_forwarded_once_and_counted() {
    let queue = unique("dedup-dup");
    declare(&queue).await;
    let mut ids: Vec<Option<String>> = (0..10).map(|i| Some(format!("order-{i}"))).collect();
    // The producer retried order-3 (same message-id), and one message has no id at all.
    ids.push(Some("order-3".to_string()));
    ids.push(None);
    publish_ids(&queue, &ids).await;
    let url = amqp_url();
    run_ok(&url, &["expand", &queue, "--factor", "2"]).await;
    let temps: Vec<String> = (0..2).map(|i| format!("{queue}.drain.{i}")).collect();

    let outcome = run_ok(
        &url,
        &[
            "forward",
            &queue,
            "--dedup",
            &redis_url(),
            "--idle-timeout",
            "2s",
        ],
    )
    .await;
    let result = &outcome["result"];
    assert_eq!(result["forwarded"], 11, "{outcome:#}");
    assert_eq!(result["duplicates_suppressed"], 1, "{outcome:#}");
    assert_eq!(result["without_id"], 1, "{outcome:#}");
    assert_eq!(result["returned_to_source"], 0, "{outcome:#}");
    assert!(
        outcome["actions"]
            .as_array()
            .is_some_and(|actions| actions.iter().any(|a| a
                .as_str()
                .is_some_and(|a| a.contains("suppress duplicates by the message-id property")))),
        "{outcome:#}"
    );
    // The statistics lag the acknowledgements by an interval.
    eventually(Duration::from_secs(15), "the source empty", || async {
        match queue_info(&queue).await.map(|q| q["messages"].clone()) {
            Some(messages) if messages == json!(0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    let seen = drain_temps(&temps).await;
    assert_eq!(seen.len(), 11);
    let with_id: Vec<&(String, Option<String>)> =
        seen.iter().filter(|(id, _)| !id.is_empty()).collect();
    assert_eq!(with_id.len(), 10, "order-3 once: {seen:?}");
    for (id, stamped) in &with_id {
        assert_eq!(
            stamped.as_deref(),
            Some(id.as_str()),
            "id stamped into {ID_HEADER}"
        );
    }
    assert!(counts(with_id.iter().map(|(id, _)| id.clone()))
        .values()
        .all(|count| *count == 1));

    // The human summary says it too.
    publish_ids(&queue, &[Some("order-3".to_string())]).await;
    let output = mqdrain(&[
        "--url",
        &url,
        "forward",
        &queue,
        "--dedup",
        &redis_url(),
        "--idle-timeout",
        "2s",
    ])
    .await;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(text.contains("1 duplicates suppressed"), "{text}");
    delete_queues(&[vec![queue], temps].concat()).await;
}

#[tokio::test]
async fn unreachable_redis_stops_the_forward_unless_optional() {
    let queue = unique("dedup-noredis");
    declare(&queue).await;
    let ids: Vec<Option<String>> = (0..20).map(|i| Some(format!("m-{i}"))).collect();
    publish_ids(&queue, &ids).await;
    let url = amqp_url();
    run_ok(&url, &["expand", &queue, "--factor", "2"]).await;
    let temps: Vec<String> = (0..2).map(|i| format!("{queue}.drain.{i}")).collect();
    // Nothing listens on port 1.
    let dead = "redis://127.0.0.1:1/";

    let refused = run(
        &url,
        &["forward", &queue, "--dedup", dead, "--idle-timeout", "2s"],
    )
    .await;
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
    let message = stderr(&refused);
    assert!(
        message.contains("cannot reach Redis (--dedup) at redis://127.0.0.1:1/"),
        "{message}"
    );
    assert!(message.contains("--dedup-optional"), "{message}");
    eventually(
        Duration::from_secs(20),
        "all 20 still on the source",
        || {
            let queue = queue.clone();
            async move {
                match queue_info(&queue).await {
                    Some(info)
                        if info["messages"] == 20 && info["messages_unacknowledged"] == 0 =>
                    {
                        Ok(())
                    }
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;

    let optional = run(
        &url,
        &[
            "forward",
            &queue,
            "--dedup",
            dead,
            "--dedup-optional",
            "--idle-timeout",
            "2s",
        ],
    )
    .await;
    assert!(optional.status.success(), "{}", stderr(&optional));
    let warnings = stderr(&optional);
    assert!(
        warnings.contains("WITHOUT duplicate suppression"),
        "a warning event: {warnings}"
    );
    let outcome = stdout_json(&optional);
    assert_eq!(outcome["result"]["forwarded"], 20);
    assert!(outcome["result"]["dedup_bypassed"]
        .as_str()
        .is_some_and(|reason| reason.contains("Redis")));
    let seen = drain_temps(&temps).await;
    assert_eq!(seen.len(), 20);
    assert!(
        seen.iter()
            .all(|(id, stamped)| stamped.as_deref() == Some(id.as_str())),
        "ids are stamped even without Redis"
    );
    delete_queues(&[vec![queue], temps].concat()).await;
}

/// SIGKILL in the middle of a RabbitMQ forward, then a rerun. What the killed forwarder had
/// delivered and marked done is skipped (acknowledged) by the rerun, what it had not delivered is
/// published once; the only ids that can appear twice are the ones the broker had taken but the
/// dead forwarder had not yet marked done — checked id by id against Redis at the kill.
#[tokio::test]
async fn killed_rabbit_forwarder_rerun_publishes_each_marked_id_once() {
    let queue = unique("dedup-kill");
    // Enough that the kill lands mid-forward at full speed: unpaced, the window stays full and
    // acknowledgements go out in whole batches, so marked messages are unacknowledged at the kill.
    let total = 40_000;
    declare(&queue).await;
    let ids: Vec<Option<String>> = (0..total).map(|i| Some(format!("k-{i}"))).collect();
    publish_ids(&queue, &ids).await;
    let url = amqp_url();
    run_ok(&url, &["expand", &queue, "--factor", "2"]).await;
    let temps: Vec<String> = (0..2).map(|i| format!("{queue}.drain.{i}")).collect();

    let redis = redis_url();
    let mut child = mqdrain_command(&[
        "--url",
        &url,
        "forward",
        &queue,
        "--dedup",
        &redis,
        // Large batches leave delivered (and marked) messages unacknowledged at the kill.
        "--ack-batch",
        "500",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .kill_on_drop(true)
    .spawn()
    .expect("forwarder starts");
    eventually(Duration::from_secs(60), "6000 forwarded", || {
        let temps = temps.clone();
        async move {
            let mut sum = 0;
            for temp in &temps {
                sum += queue_info(temp)
                    .await
                    .and_then(|q| q["messages"].as_u64())
                    .unwrap_or(0);
            }
            if sum >= 6000 {
                Ok(())
            } else {
                Err(format!("{sum} in the temporary queues"))
            }
        }
    })
    .await;
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("reaped");
    // The broker notices the dead connection (real time over AMQP, unlike the management
    // statistics) and puts its unacknowledged messages back.
    let counter = amqp_connection("test counter").await;
    let left_on_source: u64 = eventually(
        Duration::from_secs(30),
        "the dead forwarder's consumer to go",
        || {
            let (counter, queue) = (&counter, queue.clone());
            async move {
                let channel = counter.create_channel().await.map_err(|e| e.to_string())?;
                let declared = channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = channel.close(200, "counted".into()).await;
                if declared.consumer_count() == 0 {
                    Ok(u64::from(declared.message_count()))
                } else {
                    Err(format!("{} consumer(s)", declared.consumer_count()))
                }
            }
        },
    )
    .await;
    let _ = counter.close(200, "done".into()).await;

    // What the killed forwarder delivered, and which of those it had marked done.
    let first: Vec<String> = drain_temps(&temps)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let first_set: HashSet<String> = first.iter().cloned().collect();
    assert_eq!(
        first.len(),
        first_set.len(),
        "no duplicates before the kill"
    );
    let delivered: Vec<String> = first_set.iter().cloned().collect();
    let keys: Vec<String> = delivered
        .iter()
        .map(|id| format!("mqdrain:dedup:amqp:/:{queue}:{id}"))
        .collect();
    let done_flags = tokio::task::spawn_blocking(move || held(&keys, "done"))
        .await
        .expect("redis")
        .expect("redis answers");
    let unmarked: HashSet<String> = delivered
        .iter()
        .zip(&done_flags)
        .filter(|(_, done)| !**done)
        .map(|(id, _)| id.clone())
        .collect();

    let rerun = run_ok(
        &url,
        &[
            "forward",
            &queue,
            "--dedup",
            &redis,
            "--dedup-inflight-ttl",
            "2s",
            "--idle-timeout",
            "3s",
        ],
    )
    .await;
    let result = &rerun["result"];
    let second: Vec<String> = drain_temps(&temps)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let second_set: HashSet<String> = second.iter().cloned().collect();
    println!(
        "killed after delivering {} ({} not yet marked done); rerun: {} published, {} suppressed",
        first.len(),
        unmarked.len(),
        second.len(),
        result["duplicates_suppressed"]
    );
    assert_eq!(
        second.len(),
        second_set.len(),
        "the rerun publishes each id once"
    );
    let expected: HashSet<String> = (0..total).map(|i| format!("k-{i}")).collect();
    let all: HashSet<String> = first_set.union(&second_set).cloned().collect();
    assert_eq!(all, expected, "no id lost");
    let twice: HashSet<String> = first_set.intersection(&second_set).cloned().collect();
    assert_eq!(
        twice, unmarked,
        "published again exactly the ids the broker had taken but the dead forwarder had not marked done"
    );
    assert!(
        twice.len() <= 1000,
        "at most the confirm window: {}",
        twice.len()
    );
    // What went back to the source although delivered: the marked part of it is suppressed.
    let delivered_but_unacked = left_on_source - (total as u64 - first.len() as u64);
    assert_eq!(
        result["duplicates_suppressed"].as_u64(),
        Some(delivered_but_unacked - unmarked.len() as u64),
        "every delivered-and-marked message that came back ({delivered_but_unacked} came back, {} of them unmarked) is suppressed: {result}",
        unmarked.len()
    );
    delete_queues(&[vec![queue], temps].concat()).await;
}

/// For each of `keys`, whether it holds `value` (the test's own Redis client; one MGET, never
/// KEYS, which would stall a Redis holding other runs' marks).
fn held(keys: &[String], value: &str) -> Result<Vec<bool>, String> {
    let client = redis::Client::open(redis_url()).map_err(|error| error.to_string())?;
    let mut connection = client.get_connection().map_err(|error| error.to_string())?;
    let mut flags = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(1000) {
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(chunk)
            .query(&mut connection)
            .map_err(|error| error.to_string())?;
        flags.extend(values.iter().map(|held| held.as_deref() == Some(value)));
    }
    Ok(flags)
}

// ------------------------------------------------------------------------------------------
// Kafka

fn kafka_config(group: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("log_level", "3");
    config
}

/// The group's committed offsets, summed over `partitions`.
fn committed_total(group: &str, topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = kafka_config(group).create().expect("consumer");
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition);
    }
    consumer
        .committed_offsets(list, Duration::from_secs(10))
        .expect("committed offsets")
        .elements()
        .iter()
        .filter_map(|element| match element.offset() {
            Offset::Offset(offset) => Some(offset),
            _ => None,
        })
        .sum()
}

/// Every record of `topic` (all partitions, from the start): its x-mqdrain-id header.
fn read_ids(topic: &str, partitions: i32) -> Vec<String> {
    let consumer: BaseConsumer = kafka_config(&unique("reader")).create().expect("consumer");
    let mut ends = Vec::new();
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .expect("watermarks");
        list.add_partition_offset(topic, partition, Offset::Offset(low))
            .expect("offset");
        ends.push(high);
    }
    consumer.assign(&list).expect("assign");
    let wanted: i64 = ends.iter().sum::<i64>();
    let mut ids = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (ids.len() as i64) < wanted && std::time::Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            let id = message
                .headers()
                .and_then(|headers| headers.iter().find(|h| h.key == ID_HEADER))
                .and_then(|header| header.value)
                .map(|value| String::from_utf8_lossy(value).into_owned())
                .unwrap_or_default();
            ids.push(id);
        }
    }
    ids
}

/// SIGKILL in the middle of a Kafka forward, then a rerun. Ids are the source records'
/// `<topic>-<partition>-<offset>`. Of what was forwarded but not committed when it died, the
/// rerun skips (and commits) every message marked done; only the ones the broker had taken but
/// the dead forwarder had not yet marked can appear twice — a few, never more than the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_kafka_forwarder_rerun_skips_what_was_delivered() {
    let topic = unique("dedup-kafka");
    let group = unique("dedup-kafka-app");
    let per_partition = 15_000;
    kafka::create_topic(&topic, 2, &[]).await;
    for partition in 0..2 {
        kafka::produce(&topic, partition, per_partition).await;
    }
    kafka::commit(&group, &topic, &[0, 0]);
    let url = kafka_url();
    run_ok(&url, &["expand", &topic, "--factor", "2"]).await;
    let temp = format!("{topic}.drain");
    let redis = redis_url();

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mqdrain"))
        .args([
            "--url",
            &url,
            "forward",
            &topic,
            "--group",
            &group,
            "--dedup",
            &redis,
            "--rate-limit",
            "4000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("forwarder starts");
    eventually(
        Duration::from_secs(60),
        "the forwarder to commit 8000",
        || {
            let (group, topic) = (group.clone(), topic.clone());
            async move {
                let sum = tokio::task::spawn_blocking(move || committed_total(&group, &topic, 2))
                    .await
                    .map_err(|error| error.to_string())?;
                if sum >= 8_000 {
                    Ok(())
                } else {
                    Err(format!("committed {sum}"))
                }
            }
        },
    )
    .await;
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("reaped");
    // Requests the dead forwarder had already sent (produce, commit) may still be processed by
    // the broker: count once they landed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (committed_at_kill, in_temp_at_kill) = {
        let (group, topic, temp) = (group.clone(), topic.clone(), temp.clone());
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = kafka_config("test-observer").create().expect("consumer");
            let in_temp: i64 = (0..4)
                .map(|partition| {
                    let (low, high) = consumer
                        .fetch_watermarks(&temp, partition, Duration::from_secs(10))
                        .expect("watermarks");
                    high - low
                })
                .sum();
            (committed_total(&group, &topic, 2), in_temp)
        })
        .await
        .expect("offsets")
    };
    let uncommitted = in_temp_at_kill - committed_at_kill;
    println!("killed: {committed_at_kill} committed, {in_temp_at_kill} in the temporary topic");
    assert!(
        committed_at_kill < 2 * per_partition as i64,
        "killed before the end"
    );

    let rerun = run_ok(
        &url,
        &[
            "forward",
            &topic,
            "--group",
            &group,
            "--dedup",
            &redis,
            "--dedup-inflight-ttl",
            "2s",
            "--idle-timeout",
            "3s",
        ],
    )
    .await;
    let result = &rerun["result"];
    let suppressed = result["duplicates_suppressed"].as_i64().unwrap_or(-1);
    let ids = tokio::task::spawn_blocking({
        let temp = temp.clone();
        move || read_ids(&temp, 4)
    })
    .await
    .expect("read");
    let counted = counts(ids.iter().cloned());
    let expected: Vec<String> = (0..2)
        .flat_map(|partition| {
            let topic = topic.clone();
            (0..per_partition).map(move |offset| format!("{topic}-{partition}-{offset}"))
        })
        .collect();
    let missing = expected
        .iter()
        .filter(|id| !counted.contains_key(*id))
        .count();
    let duplicates = ids.len() - counted.len();
    println!(
        "rerun: {uncommitted} forwarded but uncommitted at the kill, {suppressed} suppressed, {duplicates} duplicates"
    );
    assert_eq!(missing, 0, "no id lost");
    assert_eq!(counted.len(), expected.len(), "only the source's ids");
    assert_eq!(
        suppressed + duplicates as i64,
        uncommitted,
        "each forwarded-but-uncommitted message is either suppressed or (not yet marked done) re-published"
    );
    assert!(
        suppressed > 0,
        "delivered messages were skipped on the rerun"
    );
    assert!(
        duplicates <= 1000,
        "duplicates only from the dead forwarder's confirm window: {duplicates}"
    );
}

/// A Redis of the test's own, so that it can fail in the middle of a forward.
struct PrivateRedis {
    child: std::process::Child,
    url: String,
}

impl PrivateRedis {
    fn start() -> Self {
        // One port per test of this process, away from the shared brokers'.
        static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        let offset = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 21_000 + (std::process::id() % 4_000) as u16 * 4 + offset;
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/brokers installs it)");
        let url = format!("redis://127.0.0.1:{port}/");
        let client = redis::Client::open(url.as_str()).expect("url");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while client.get_connection().is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "private Redis did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        PrivateRedis { child, url }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a rate-limited forward with `--dedup` on a private Redis, kills that Redis once the
/// forward is under way, and returns the forward's output and the queue's names.
async fn forward_while_redis_dies(extra: &[&str]) -> (std::process::Output, String, Vec<String>) {
    let queue = unique("dedup-redis-dies");
    declare(&queue).await;
    let ids: Vec<Option<String>> = (0..6000).map(|i| Some(format!("r-{i}"))).collect();
    publish_ids(&queue, &ids).await;
    let url = amqp_url();
    run_ok(&url, &["expand", &queue, "--factor", "2"]).await;
    let temps: Vec<String> = (0..2).map(|i| format!("{queue}.drain.{i}")).collect();
    let redis = PrivateRedis::start();
    let mut args = vec![
        "--url",
        url.as_str(),
        "forward",
        queue.as_str(),
        "--dedup",
        redis.url.as_str(),
        // Slow enough that Redis dies mid-forward although the statistics the test waits on
        // lag by seconds: 6000 messages take 12 s.
        "--rate-limit",
        "500",
        "--idle-timeout",
        "3s",
    ];
    args.extend_from_slice(extra);
    let child = mqdrain_command(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("forwarder starts");
    eventually(Duration::from_secs(60), "1000 forwarded", || {
        let temps = temps.clone();
        async move {
            let mut sum = 0;
            for temp in &temps {
                sum += queue_info(temp)
                    .await
                    .and_then(|q| q["messages"].as_u64())
                    .unwrap_or(0);
            }
            if sum >= 1000 {
                Ok(())
            } else {
                Err(format!("{sum} in the temporary queues"))
            }
        }
    })
    .await;
    redis.kill();
    let output = child.wait_with_output().await.expect("forward ends");
    (output, queue, temps)
}

#[tokio::test]
async fn redis_failing_mid_forward_stops_it_without_loss() {
    let (output, queue, temps) = forward_while_redis_dies(&[]).await;
    let message = stderr(&output);
    assert!(!output.status.success(), "{message}");
    assert!(message.contains("Redis (--dedup)"), "{message}");
    assert!(message.contains("--dedup-optional"), "{message}");
    // Everything is on the source or in a temporary queue (at least once).
    let mut seen: HashSet<String> = drain_temps(&temps)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let connection = amqp_connection("test checker").await;
    seen.extend(
        consume_all(&connection, &queue, QUIET)
            .await
            .iter()
            .map(message_id),
    );
    let _ = connection.close(200, "done".into()).await;
    let missing = (0..6000)
        .filter(|i| !seen.contains(&format!("r-{i}")))
        .count();
    assert_eq!(missing, 0, "no message lost when Redis failed");
    delete_queues(&[vec![queue], temps].concat()).await;
}

#[tokio::test]
async fn redis_failing_mid_forward_is_bypassed_when_optional() {
    let (output, queue, temps) = forward_while_redis_dies(&["--dedup-optional"]).await;
    let message = stderr(&output);
    assert!(output.status.success(), "{message}");
    assert!(
        message.contains("duplicate suppression is OFF for the rest of this forward"),
        "a warning event: {message}"
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("duplicate suppression was bypassed"),
        "{text}"
    );
    let seen = drain_temps(&temps).await;
    let ids: HashSet<String> = seen.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), 6000, "everything forwarded");
    delete_queues(&[vec![queue], temps].concat()).await;
}
