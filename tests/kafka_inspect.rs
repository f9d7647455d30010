//! `mqdrain inspect` against a real Kafka-protocol broker: exact lag, warnings, error cases.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

async fn inspect_json(topic: &str, extra: &[&str]) -> Value {
    let url = kafka_url();
    let mut args = vec!["--url", url.as_str(), "inspect", topic, "--output", "json"];
    args.extend_from_slice(extra);
    let output = mqdrain(&args).await;
    assert!(
        output.status.success(),
        "inspect failed: {}",
        stderr(&output)
    );
    stdout_json(&output)
}

fn warning_codes(report: &Value) -> Vec<String> {
    report["warnings"]
        .as_array()
        .map(|warnings| {
            warnings
                .iter()
                .filter_map(|warning| warning["code"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn lag_per_partition_is_exact() {
    let topic = unique("lag");
    let group = unique("lag-group");
    kafka::create_topic(
        &topic,
        3,
        &[
            ("retention.ms", "604800000"),
            ("retention.bytes", "1073741824"),
            ("cleanup.policy", "delete"),
        ],
    )
    .await;
    kafka::produce(&topic, 0, 10).await;
    kafka::produce(&topic, 1, 20).await;
    kafka::produce(&topic, 2, 30).await;
    kafka::commit(&group, &topic, &[3, 5, 7]);

    let report = inspect_json(&topic, &["--group", &group, "--sample", "1s"]).await;
    assert_eq!(report["broker"], "kafka");
    assert_eq!(report["name"], topic.as_str());
    assert_eq!(report["group"], group.as_str());
    assert_eq!(report["lag"], 7 + 15 + 23);
    let partitions = report["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 3);
    for (index, (high, committed)) in [(10, 3), (20, 5), (30, 7)].into_iter().enumerate() {
        let partition = &partitions[index];
        assert_eq!(partition["partition"], index);
        assert_eq!(partition["low"], 0);
        assert_eq!(partition["high"], high);
        assert_eq!(partition["committed"], committed);
        assert_eq!(partition["lag"], high - committed);
    }
    assert_eq!(report["settings"]["retention_ms"], 604_800_000_i64);
    assert_eq!(report["settings"]["retention_bytes"], 1_073_741_824_i64);
    assert_eq!(report["settings"]["cleanup_policy"], "delete");
    assert_eq!(report["members"], serde_json::json!([]));
    assert_eq!(report["group_state"], "Empty");
    assert_eq!(report["drain"]["state"], "stalled");
    assert_eq!(
        report["warnings"],
        serde_json::json!([]),
        "healthy: {report}"
    );
}

#[tokio::test]
async fn a_live_member_draining_the_lag_gets_an_eta() {
    let topic = unique("draining");
    let group = unique("draining-group");
    kafka::create_topic(&topic, 2, &[]).await;
    kafka::produce(&topic, 0, 3000).await;
    kafka::produce(&topic, 1, 3000).await;
    let member = kafka::paced_member(&topic, &group, 200);
    let report = eventually(
        Duration::from_secs(60),
        "the member to join and drain",
        || async {
            let url = kafka_url();
            let output = mqdrain(&[
                "--url", &url, "inspect", &topic, "--group", &group, "--sample", "3s", "--output",
                "json",
            ])
            .await;
            // Until the member joined (or committed) the group does not exist yet: exit 3.
            if !output.status.success() {
                return Err(stderr(&output));
            }
            let report = stdout_json(&output);
            if report["group_state"] == "Stable" && report["drain"]["state"] == "draining" {
                Ok(report)
            } else {
                Err(report.to_string())
            }
        },
    )
    .await;
    member.abort();
    let members = report["members"].as_array().unwrap();
    assert_eq!(members.len(), 1, "{report}");
    // Kafka names members <client.id>-<uuid>; Nisshi leaves client_id itself empty (null).
    let member_id = members[0]["member_id"].as_str().unwrap();
    assert!(member_id.starts_with("test-paced-member-"), "{report}");
    let eta = report["drain"]["eta_secs"].as_f64().expect("a numeric ETA");
    assert!(eta > 0.0, "{report}");
    assert!(report["drain"]["net_drain_rate"].as_f64().unwrap() > 0.0);
    let lag = report["lag"].as_u64().unwrap();
    assert!(lag > 0 && lag < 6000, "{report}");
    assert_eq!(report["warnings"], serde_json::json!([]), "{report}");
}

#[tokio::test]
async fn load_seeds_a_topic_and_a_group_that_committed_part_of_it() {
    let topic = unique("load");
    let group = unique("load-group");
    let url = kafka_url();
    let output = mqdrain(&[
        "--url",
        &url,
        "load",
        "publish",
        &topic,
        "--declare",
        "--partitions",
        "3",
        "--count",
        "300",
    ])
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    // The group consumes and commits all of it, then 150 more arrive: 50 behind per partition.
    let output = mqdrain(&[
        "--url",
        &url,
        "load",
        "consume",
        &topic,
        "--group",
        &group,
        "--until-empty",
        "--idle",
        "2s",
    ])
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let summary = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(summary.contains("300 messages"), "{summary}");
    let output = mqdrain(&["--url", &url, "load", "publish", &topic, "--count", "150"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let report = inspect_json(&topic, &["--group", &group, "--sample", "0s"]).await;
    let partitions = report["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 3, "{report}");
    for partition in partitions {
        // Round-robin: 100 + 50 records in each partition.
        assert_eq!(partition["high"], 150, "{report}");
        assert_eq!(partition["committed"], 100, "{report}");
        assert_eq!(partition["lag"], 50, "{report}");
    }
    assert_eq!(report["lag"], 150, "{report}");
    assert_eq!(
        report["members"],
        serde_json::json!([]),
        "the consumer left"
    );

    let output = mqdrain(&["--url", &url, "load", "consume", &topic]).await;
    let line = error_line(&output, 2);
    assert!(line.contains("needs --group"), "{line}");
}

#[tokio::test]
async fn without_group_lag_is_null_not_zero() {
    let topic = unique("nogroup");
    kafka::create_topic(&topic, 2, &[]).await;
    kafka::produce(&topic, 1, 4).await;
    let report = inspect_json(&topic, &[]).await;
    assert!(report["lag"].is_null(), "{report}");
    assert!(report["group"].is_null());
    assert_eq!(report["partitions"][1]["high"], 4);
    assert!(report["partitions"][1]["committed"].is_null());
    assert!(report["partitions"][1]["lag"].is_null());
}

#[tokio::test]
async fn growing_lag_without_members_warns() {
    let topic = unique("growing");
    let group = unique("growing-group");
    kafka::create_topic(&topic, 1, &[]).await;
    kafka::produce(&topic, 0, 5).await;
    kafka::commit(&group, &topic, &[2]);
    let producer_topic = topic.clone();
    let producer = tokio::spawn(async move {
        for _ in 0..200 {
            kafka::produce(&producer_topic, 0, 20).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let report = inspect_json(&topic, &["--group", &group, "--sample", "3s"]).await;
    producer.abort();
    assert_eq!(report["drain"]["state"], "growing", "{report}");
    assert!(
        warning_codes(&report).contains(&"no-consumers-growing".to_string()),
        "{report}"
    );
}

#[tokio::test]
async fn committed_offset_below_low_watermark_is_data_loss() {
    let topic = unique("loss");
    let group = unique("loss-group");
    kafka::create_topic(&topic, 1, &[]).await;
    kafka::produce(&topic, 0, 50).await;
    kafka::commit(&group, &topic, &[5]);
    kafka::delete_records_before(&topic, 0, 20)
        .await
        .expect("the broker deletes records");
    let report = inspect_json(&topic, &["--group", &group, "--sample", "0s"]).await;
    assert_eq!(report["partitions"][0]["low"], 20, "{report}");
    assert!(
        warning_codes(&report).contains(&"retention-data-loss".to_string()),
        "{report}"
    );
    // Only what is still retained can be consumed.
    assert_eq!(report["lag"], 30);
}

#[tokio::test]
async fn unconsumed_head_next_to_deletion_warns() {
    let topic = unique("near");
    let group = unique("near-group");
    kafka::create_topic(&topic, 1, &[]).await;
    kafka::produce(&topic, 0, 200).await;
    kafka::delete_records_before(&topic, 0, 10)
        .await
        .expect("the broker deletes records");
    kafka::commit(&group, &topic, &[12]);
    let report = inspect_json(&topic, &["--group", &group, "--sample", "0s"]).await;
    let codes = warning_codes(&report);
    assert!(codes.contains(&"retention-near".to_string()), "{report}");
    assert!(
        !codes.contains(&"retention-data-loss".to_string()),
        "{report}"
    );
}

#[tokio::test]
async fn unknown_topic_and_group_exit_3() {
    let url = kafka_url();
    let topic = unique("missing");
    let output = mqdrain(&["--url", &url, "inspect", &topic]).await;
    let line = error_line(&output, 3);
    assert!(
        line.contains(&format!("topic '{topic}' not found")),
        "{line}"
    );

    let existing = unique("exists");
    kafka::create_topic(&existing, 1, &[]).await;
    let group = unique("nobody");
    let output = mqdrain(&["--url", &url, "inspect", &existing, "--group", &group]).await;
    let line = error_line(&output, 3);
    assert!(
        line.contains(&format!("consumer group '{group}' not found")),
        "{line}"
    );
}

#[tokio::test]
async fn unreachable_kafka_exits_4() {
    let output = mqdrain(&[
        "--url",
        "kafka://127.0.0.1:1",
        "-X",
        "sasl.password=Sup3rSecret",
        "inspect",
        "orders",
    ])
    .await;
    let line = error_line(&output, 4);
    assert!(
        line.contains("cannot reach Kafka at kafka://127.0.0.1:1"),
        "{line}"
    );
    assert!(!stderr(&output).contains("Sup3rSecret"), "{line}");
}
