//! The Kafka drain cycle through the mqdrain binary against a real Kafka-protocol broker:
//! stop-consumers, expand, forward, watch and restore as an operator types them, with the test's
//! own rdkafka clients as the producer, the temporary consumers and the observer; and the dry runs
//! of expand and forward leaving the broker untouched.

mod common;

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::process::Output;
use std::time::{Duration, Instant};

const PER_PARTITION: usize = 1000;
const PARTITIONS: i32 = 3;
const TOTAL: usize = PER_PARTITION * PARTITIONS as usize;

async fn run(args: &[&str]) -> Output {
    let url = kafka_url();
    let mut full = vec!["--url", url.as_str()];
    full.extend_from_slice(args);
    mqdrain(&full).await
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn run_ok(args: &[&str]) -> Output {
    let output = run(args).await;
    assert!(
        output.status.success(),
        "mqdrain {args:?} failed ({:?}): {}\nstdout: {}",
        output.status.code(),
        stderr(&output),
        stdout(&output)
    );
    output
}

fn client_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", kafka_bootstrap())
        .set("log_level", "3");
    config
}

fn observer() -> BaseConsumer {
    client_config()
        .set("group.id", "test-observer")
        .create()
        .expect("observer")
}

/// High watermark per partition.
fn ends(topic: &str, partitions: i32) -> Vec<i64> {
    let consumer = observer();
    (0..partitions)
        .map(|partition| {
            consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .expect("watermarks")
                .1
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

/// Partitions of `topic` the metadata lists; `None` when the topic does not exist.
fn partitions_of(topic: &str) -> Option<usize> {
    let metadata = observer()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len())
}

/// The scaled-up consumers: reads `topic` under `group` until `expected` messages arrived,
/// commits their positions and leaves the group. Returns how often each payload was seen and the
/// temporary partition each landed in.
async fn consume_and_commit(
    topic: &str,
    group: &str,
    expected: usize,
) -> HashMap<String, (usize, i32)> {
    let consumer: StreamConsumer = client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("client.id", "test-temp-consumer")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut seen: HashMap<String, (usize, i32)> = HashMap::new();
    let mut count = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while count < expected {
        assert!(
            Instant::now() < deadline,
            "read only {count} of {expected} messages from {topic}"
        );
        match tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await {
            Ok(Ok(message)) => {
                let payload = String::from_utf8_lossy(message.payload().unwrap_or_default());
                let entry = seen
                    .entry(payload.into_owned())
                    .or_insert((0, message.partition()));
                entry.0 += 1;
                count += 1;
            }
            Ok(Err(error)) => panic!("temporary consumer: {error}"),
            Err(_) => {}
        }
    }
    consumer
        .commit_consumer_state(CommitMode::Sync)
        .expect("commit");
    tokio::task::spawn_blocking(move || drop(consumer))
        .await
        .expect("consumer leaves the group");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_cycle_through_the_cli_moves_every_message_and_removes_the_temporary_topic() {
    let topic = unique("cli-cycle");
    let group = unique("cli-app");
    let temp_group = unique("cli-temp");
    let temp = format!("{topic}.drain");
    kafka::create_topic(&topic, PARTITIONS, &[]).await;
    for partition in 0..PARTITIONS {
        kafka::produce(&topic, partition, PER_PARTITION).await;
    }
    kafka::commit(&group, &topic, &[0, 0, 0]);

    let stopped = run_ok(&["stop-consumers", &topic, "--group", &group, "--wait", "10s"]).await;
    assert!(
        stdout(&stopped).contains("has no members"),
        "{}",
        stdout(&stopped)
    );

    // Dry runs change nothing: no temporary topic, the group's offsets where they were.
    let dry = run_ok(&["expand", &topic, "--factor", "2", "--dry-run"]).await;
    assert!(stdout(&dry).contains("would create"), "{}", stdout(&dry));
    assert_eq!(
        partitions_of(&temp),
        None,
        "expand --dry-run created nothing"
    );

    let expanded = run_ok(&["expand", &topic, "--factor", "2", "--output", "json"]).await;
    let outcome = stdout_json(&expanded);
    assert_eq!(outcome["partitions"], 6, "{outcome:#}");
    assert_eq!(
        outcome["temporary"],
        serde_json::json!([temp]),
        "{outcome:#}"
    );
    assert_eq!(partitions_of(&temp), Some(6));

    let dry = run_ok(&["forward", &topic, "--group", &group, "--dry-run"]).await;
    assert!(stdout(&dry).contains("would consume"), "{}", stdout(&dry));
    assert_eq!(
        committed(&group, &topic, PARTITIONS),
        vec![Some(0); PARTITIONS as usize],
        "forward --dry-run moved no offset"
    );
    assert_eq!(
        ends(&temp, 6),
        vec![0; 6],
        "forward --dry-run produced nothing"
    );

    let forwarded = run_ok(&[
        "forward",
        &topic,
        "--group",
        &group,
        "--idle-timeout",
        "3s",
        "--output",
        "json",
    ])
    .await;
    let summary = stdout_json(&forwarded);
    assert_eq!(summary["result"]["forwarded"], TOTAL, "{summary:#}");
    assert_eq!(summary["result"]["stopped_by"], "idle", "{summary:#}");
    let source_ends = ends(&topic, PARTITIONS);
    assert_eq!(
        committed(&group, &topic, PARTITIONS),
        source_ends.iter().map(|&end| Some(end)).collect::<Vec<_>>(),
        "the original group is committed at the end of what was forwarded"
    );

    let seen = consume_and_commit(&temp, &temp_group, TOTAL).await;
    assert_eq!(seen.len(), TOTAL, "every message arrives");
    for (payload, (count, partition)) in &seen {
        assert_eq!(*count, 1, "{payload} arrived {count} times");
        // Payloads are p<source partition>-m<index>; p fans out into [2p, 2p+2).
        let source: i32 = payload[1..payload.find('-').expect("payload shape")]
            .parse()
            .expect("source partition");
        assert!(
            (source * 2..source * 2 + 2).contains(partition),
            "{payload} landed in {temp}[{partition}]"
        );
    }

    let watched = run_ok(&[
        "watch",
        &topic,
        "--group",
        &group,
        "--temp-group",
        &temp_group,
        "--until-drained",
        "--interval",
        "1s",
        "--timeout",
        "60s",
    ])
    .await;
    assert!(stdout(&watched).contains("drained"), "{}", stdout(&watched));

    let restored = run_ok(&[
        "restore",
        &topic,
        "--group",
        &group,
        "--temp-group",
        &temp_group,
        "--output",
        "json",
    ])
    .await;
    let outcome = stdout_json(&restored);
    assert!(
        outcome["deleted"]
            .as_array()
            .is_some_and(|deleted| deleted.iter().any(|name| name == temp.as_str())),
        "{outcome:#}"
    );
    assert_eq!(partitions_of(&temp), None, "the temporary topic is gone");
    assert_eq!(
        committed(&group, &topic, PARTITIONS),
        source_ends.iter().map(|&end| Some(end)).collect::<Vec<_>>(),
        "restore leaves the original group where forward put it"
    );
}
