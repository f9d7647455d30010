//! `mqdrain inspect` against a real RabbitMQ: exact counts, consumers, warnings and error cases.

mod common;

use common::*;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;
use std::time::Duration;

const STATS_WAIT: Duration = Duration::from_secs(30);

async fn inspect_json(queue: &str, extra: &[&str]) -> Value {
    let url = amqp_url();
    let mut args = vec!["--url", url.as_str(), "inspect", queue, "--output", "json"];
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

/// Waits until management statistics show `depth` messages, then returns that report.
async fn inspect_when_depth(queue: &str, depth: u64, extra: &[&str]) -> Value {
    eventually(STATS_WAIT, "management stats to catch up", || async {
        let report = inspect_json(queue, extra).await;
        if report["depth"] == depth {
            Ok(report)
        } else {
            Err(report.to_string())
        }
    })
    .await
}

async fn cleanup(queue: &str) {
    let connection = amqp_connection("test cleanup").await;
    if let Ok(channel) = connection.create_channel().await {
        let _ = channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "bye".into()).await;
}

#[tokio::test]
async fn counts_ready_unacked_and_consumers_exactly() {
    let queue = unique("counts");
    let producer = amqp_connection("test producer").await;
    let channel = producer.create_channel().await.unwrap();
    declare_queue(&channel, &queue, &[]).await;
    assert_eq!(publish(&channel, &queue, 100).await, 100);

    // Somebody else's stuck consumer: holds 30 messages unacked.
    let stuck = amqp_connection("orders-worker stuck").await;
    let stuck_channel = stuck.create_channel().await.unwrap();
    stuck_channel
        .basic_qos(30, BasicQosOptions::default())
        .await
        .unwrap();
    let _consumer = stuck_channel
        .basic_consume(
            queue.as_str().into(),
            "stuck".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let report = eventually(STATS_WAIT, "30 unacked in the stats", || async {
        let report = inspect_json(&queue, &["--sample", "0s"]).await;
        if report["unacked"] == 30 && report["consumers"] == 1 {
            Ok(report)
        } else {
            Err(report.to_string())
        }
    })
    .await;
    assert_eq!(report["broker"], "rabbitmq");
    assert_eq!(report["name"], queue.as_str());
    assert_eq!(report["depth"], 100);
    assert_eq!(report["ready"], 70);
    assert_eq!(report["unacked"], 30);
    let consumers = report["consumer_list"].as_array().unwrap();
    assert_eq!(consumers.len(), 1);
    assert_eq!(consumers[0]["connection"], "orders-worker stuck");
    assert_eq!(consumers[0]["prefetch"], 30);
    assert_eq!(consumers[0]["user"], "guest");
    assert_eq!(consumers[0]["peer_host"], "127.0.0.1");
    assert_eq!(consumers[0]["ack_required"], true);
    assert_eq!(consumers[0]["mqdrain"], false);
    assert_eq!(report["queue_type"], "classic");
    assert_eq!(report["durable"], true);
    assert_eq!(report["management_api"], true);

    let _ = stuck.close(200, "bye".into()).await;
    cleanup(&queue).await;
}

#[tokio::test]
async fn human_view_names_the_numbers() {
    let queue = unique("human");
    let connection = amqp_connection("test producer").await;
    let channel = connection.create_channel().await.unwrap();
    declare_queue(&channel, &queue, &[]).await;
    publish(&channel, &queue, 7).await;
    inspect_when_depth(&queue, 7, &["--sample", "0s"]).await;
    let url = amqp_url();
    let output = mqdrain(&["--url", &url, "inspect", &queue, "--sample", "1s"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains(&format!("RabbitMQ queue '{queue}'")),
        "{text}"
    );
    assert!(text.contains("depth      7"), "{text}");
    assert!(text.contains("drain"), "{text}");
    cleanup(&queue).await;
}

#[tokio::test]
async fn ttl_with_dead_letter_exchange_warns_of_dead_lettering() {
    let queue = unique("ttl-dlx");
    let connection = amqp_connection("test producer").await;
    let channel = connection.create_channel().await.unwrap();
    declare_queue(
        &channel,
        &queue,
        &[
            ("x-message-ttl", AMQPValue::LongInt(600_000)),
            (
                "x-dead-letter-exchange",
                AMQPValue::LongString("orders.dlx".into()),
            ),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString("expired".into()),
            ),
        ],
    )
    .await;
    publish(&channel, &queue, 10).await;
    let report = inspect_when_depth(&queue, 10, &["--sample", "0s"]).await;
    let warning = report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|warning| warning["code"] == "ttl-expiry")
        .unwrap_or_else(|| panic!("no ttl-expiry warning in {report}"));
    let message = warning["message"].as_str().unwrap();
    assert!(
        message.contains("dead-lettered to exchange 'orders.dlx' with routing key 'expired'"),
        "{message}"
    );
    assert_eq!(
        report["settings"]["dead_letter_routing_key"],
        serde_json::json!({"value": "expired", "source": "argument"})
    );
    assert_eq!(report["settings"]["message_ttl_ms"]["value"], 600_000);
    assert_eq!(report["settings"]["message_ttl_ms"]["source"], "argument");
    cleanup(&queue).await;
}

#[tokio::test]
async fn ttl_from_a_policy_without_dlx_warns_of_dropping() {
    let queue = unique("ttl-policy");
    let policy = format!("{queue}-policy");
    let connection = amqp_connection("test producer").await;
    let channel = connection.create_channel().await.unwrap();
    declare_queue(&channel, &queue, &[]).await;
    put_policy(
        &policy,
        &format!("^{queue}$"),
        serde_json::json!({"message-ttl": 3_600_000}),
    )
    .await;
    publish(&channel, &queue, 5).await;
    let report = eventually(STATS_WAIT, "the policy to apply", || async {
        let report = inspect_json(&queue, &["--sample", "0s"]).await;
        if report["depth"] == 5 && warning_codes(&report).contains(&"ttl-expiry".to_string()) {
            Ok(report)
        } else {
            Err(report.to_string())
        }
    })
    .await;
    let message = report["warnings"][0]["message"].as_str().unwrap();
    assert!(message.contains("dropped for good"), "{message}");
    assert_eq!(report["settings"]["message_ttl_ms"]["source"], "policy");
    assert_eq!(report["policy"], policy.as_str());
    delete_policy(&policy).await;
    cleanup(&queue).await;
}

#[tokio::test]
async fn queue_at_length_limit_with_drop_head_warns() {
    let queue = unique("maxlen-drop");
    let connection = amqp_connection("test producer").await;
    let channel = connection.create_channel().await.unwrap();
    declare_queue(
        &channel,
        &queue,
        &[("x-max-length", AMQPValue::LongInt(10))],
    )
    .await;
    publish(&channel, &queue, 25).await;
    let report = inspect_when_depth(&queue, 10, &["--sample", "0s"]).await;
    assert!(
        warning_codes(&report).contains(&"length-limit-drop-head".to_string()),
        "{report}"
    );
    assert!(!warning_codes(&report).contains(&"length-limit-reject-publish".to_string()));
    cleanup(&queue).await;
}

#[tokio::test]
async fn operator_policy_limit_is_reported_with_its_source_and_near_limit_warns() {
    let queue = unique("operator-policy");
    let policy = format!("{queue}-operator");
    let connection = amqp_connection("test producer").await;
    let channel = connection.create_channel().await.unwrap();
    declare_queue(
        &channel,
        &queue,
        &[("x-max-length", AMQPValue::LongInt(100))],
    )
    .await;
    put_operator_policy(
        &policy,
        &format!("^{queue}$"),
        serde_json::json!({"max-length": 20}),
    )
    .await;
    // 19 of 20: near the limit, not yet at it.
    publish(&channel, &queue, 19).await;
    let report = eventually(STATS_WAIT, "the operator policy to apply", || async {
        let report = inspect_json(&queue, &["--sample", "0s"]).await;
        if report["depth"] == 19 && report["operator_policy"] == policy.as_str() {
            Ok(report)
        } else {
            Err(report.to_string())
        }
    })
    .await;
    assert_eq!(
        report["settings"]["max_length"],
        serde_json::json!({"value": 20, "source": "operator-policy"}),
        "{report}"
    );
    let warning = report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|warning| warning["code"] == "length-limit-drop-head")
        .unwrap_or_else(|| panic!("no near-limit warning in {report}"));
    let message = warning["message"].as_str().unwrap();
    assert!(
        message.contains("near its length limit (19 of 20 messages)"),
        "{message}"
    );
    delete_operator_policy(&policy).await;
    cleanup(&queue).await;
}

#[tokio::test]
async fn queue_at_its_byte_limit_warns() {
    let queue = unique("maxbytes");
    let connection = amqp_connection("test producer").await;
    let channel = connection.create_channel().await.unwrap();
    declare_queue(
        &channel,
        &queue,
        &[("x-max-length-bytes", AMQPValue::LongInt(1000))],
    )
    .await;
    // About 2 kB of bodies ("payload N"): drop-head keeps the newest kilobyte.
    publish(&channel, &queue, 200).await;
    let report = eventually(STATS_WAIT, "the byte limit in the stats", || async {
        let report = inspect_json(&queue, &["--sample", "0s"]).await;
        if warning_codes(&report).contains(&"length-limit-drop-head".to_string()) {
            Ok(report)
        } else {
            Err(report.to_string())
        }
    })
    .await;
    assert_eq!(
        report["settings"]["max_length_bytes"],
        serde_json::json!({"value": 1000, "source": "argument"})
    );
    let bytes = report["message_bytes"].as_u64().unwrap();
    assert!((900..=1000).contains(&bytes), "{report}");
    let message = report["warnings"][0]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{bytes} of 1000 bytes")),
        "{message}"
    );
    cleanup(&queue).await;
}

#[tokio::test]
async fn queue_at_length_limit_with_reject_publish_warns() {
    let queue = unique("maxlen-reject");
    let connection = amqp_connection("test producer").await;
    let channel = connection.create_channel().await.unwrap();
    declare_queue(
        &channel,
        &queue,
        &[
            ("x-max-length", AMQPValue::LongInt(10)),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
        ],
    )
    .await;
    let acked = publish(&channel, &queue, 15).await;
    assert_eq!(acked, 10, "the broker refuses publishes beyond the limit");
    let report = inspect_when_depth(&queue, 10, &["--sample", "0s"]).await;
    let codes = warning_codes(&report);
    assert!(
        codes.contains(&"length-limit-reject-publish".to_string()),
        "{report}"
    );
    assert!(!codes.contains(&"length-limit-drop-head".to_string()));
    cleanup(&queue).await;
}

#[tokio::test]
async fn growing_backlog_without_consumers_warns() {
    let queue = unique("growing");
    let connection = amqp_connection("test producer").await;
    let channel = connection.create_channel().await.unwrap();
    declare_queue(&channel, &queue, &[]).await;
    publish(&channel, &queue, 20).await;
    inspect_when_depth(&queue, 20, &["--sample", "0s"]).await;

    // A live producer keeps publishing while inspect samples.
    let producer_channel = connection.create_channel().await.unwrap();
    let producer_queue = queue.clone();
    let producer = tokio::spawn(async move {
        for _ in 0..100 {
            publish(&producer_channel, &producer_queue, 10).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let report = eventually(STATS_WAIT, "growth to be seen", || async {
        let report = inspect_json(&queue, &["--sample", "4s"]).await;
        if warning_codes(&report).contains(&"no-consumers-growing".to_string()) {
            Ok(report)
        } else {
            Err(report.to_string())
        }
    })
    .await;
    assert_eq!(report["drain"]["state"], "growing");
    assert!(report["drain"]["eta_secs"].is_null());
    let publishing = report["rates"]["publish"].as_f64();
    assert!(publishing.is_some_and(|rate| rate > 0.0), "{report}");
    producer.abort();
    cleanup(&queue).await;
}

/// The test's own application: consumes `queue` at about `per_second`, acking each message.
async fn paced_consumer(
    connection: &lapin::Connection,
    queue: &str,
    per_second: u64,
) -> tokio::task::JoinHandle<()> {
    use futures_util::StreamExt;
    let channel = connection.create_channel().await.unwrap();
    let queue = queue.to_string();
    tokio::spawn(async move {
        channel
            .basic_qos(10, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "paced".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let pause = Duration::from_millis(1000 / per_second);
        while let Some(Ok(delivery)) = consumer.next().await {
            delivery
                .ack(lapin::options::BasicAckOptions::default())
                .await
                .unwrap();
            tokio::time::sleep(pause).await;
        }
    })
}

#[tokio::test]
async fn ttl_on_a_queue_that_drains_in_time_is_no_risk() {
    let queue = unique("ttl-draining");
    let connection = amqp_connection("test producer").await;
    let channel = connection.create_channel().await.unwrap();
    declare_queue(
        &channel,
        &queue,
        &[("x-message-ttl", AMQPValue::LongInt(86_400_000))],
    )
    .await;
    publish(&channel, &queue, 6000).await;
    let app = amqp_connection("orders-worker healthy").await;
    let consumer = paced_consumer(&app, &queue, 200).await;
    let report = eventually(STATS_WAIT, "the queue to be seen draining", || async {
        let report = inspect_json(&queue, &["--sample", "3s"]).await;
        if report["drain"]["state"] == "draining" {
            Ok(report)
        } else {
            Err(report.to_string())
        }
    })
    .await;
    assert_eq!(report["settings"]["message_ttl_ms"]["value"], 86_400_000);
    assert!(
        !warning_codes(&report).contains(&"ttl-expiry".to_string()),
        "draining well within a day: {report}"
    );
    let eta = report["drain"]["eta_secs"].as_f64().expect("a numeric ETA");
    assert!(eta > 0.0 && eta < 86_400.0, "{report}");
    for rate in ["deliver", "ack"] {
        let value = report["rates"][rate].as_f64();
        assert!(value.is_some_and(|value| value > 0.0), "{rate}: {report}");
    }
    assert!(report["drain"]["net_drain_rate"].as_f64().unwrap() > 0.0);
    consumer.abort();
    let _ = app.close(200, "bye".into()).await;
    cleanup(&queue).await;
}

#[tokio::test]
async fn healthy_queue_has_no_warnings() {
    let queue = unique("healthy");
    let connection = amqp_connection("test producer").await;
    let channel = connection.create_channel().await.unwrap();
    declare_queue(
        &channel,
        &queue,
        &[("x-max-length", AMQPValue::LongInt(1000))],
    )
    .await;
    publish(&channel, &queue, 5).await;
    inspect_when_depth(&queue, 5, &["--sample", "0s"]).await;
    let report = inspect_json(&queue, &["--sample", "2s"]).await;
    assert_eq!(report["depth"], 5);
    assert_eq!(report["warnings"], serde_json::json!([]), "{report}");
    assert_eq!(report["drain"]["state"], "stalled");
    cleanup(&queue).await;
}

#[tokio::test]
async fn unknown_queue_exits_3_naming_it() {
    let queue = unique("missing");
    let url = amqp_url();
    let output = mqdrain(&["--url", &url, "inspect", &queue]).await;
    let line = error_line(&output, 3);
    assert!(
        line.contains(&format!("queue '{queue}' not found in vhost '/'")),
        "{line}"
    );
}

#[tokio::test]
async fn unknown_vhost_exits_3_naming_it() {
    let vhost = unique("no-vhost");
    let url = amqp_url().replace("/%2f", &format!("/{vhost}"));
    let output = mqdrain(&["--url", &url, "inspect", "orders"]).await;
    let line = error_line(&output, 3);
    assert!(
        line.contains(&format!(
            "vhost '{vhost}' not found (or user 'guest' may not use it)"
        )),
        "{line}"
    );
    assert!(line.contains("rabbitmqctl list_vhosts"), "{line}");
    assert!(!line.contains("guest:guest"), "{line}");
}

#[tokio::test]
async fn wrong_password_exits_4_without_showing_it() {
    let url = amqp_url().replace("guest:guest", "guest:Sup3rSecret");
    let output = mqdrain(&["--url", &url, "inspect", "anything"]).await;
    let line = error_line(&output, 4);
    assert!(
        line.contains("refused the credentials of user 'guest'"),
        "{line}"
    );
    assert!(!stderr(&output).contains("Sup3rSecret"), "{line}");
}

#[tokio::test]
async fn unreachable_broker_exits_4() {
    let output = mqdrain(&[
        "--url",
        "amqp://guest:Sup3rSecret@127.0.0.1:1/%2f",
        "inspect",
        "anything",
    ])
    .await;
    let line = error_line(&output, 4);
    assert!(
        line.contains("cannot reach RabbitMQ (AMQP) at amqp://guest:***@127.0.0.1:1"),
        "{line}"
    );
    assert!(!stderr(&output).contains("Sup3rSecret"), "{line}");
}

#[tokio::test]
async fn unreachable_management_api_degrades_to_amqp() {
    let queue = unique("degraded");
    let connection = amqp_connection("test producer").await;
    let channel = connection.create_channel().await.unwrap();
    declare_queue(&channel, &queue, &[]).await;
    publish(&channel, &queue, 12).await;
    let url = amqp_url();
    let output = mqdrain(&[
        "--url",
        &url,
        "--management-url",
        "http://127.0.0.1:1",
        "inspect",
        &queue,
        "--output",
        "json",
        "--sample",
        "0s",
    ])
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let report = stdout_json(&output);
    assert_eq!(report["ready"], 12);
    assert_eq!(report["consumers"], 0);
    assert!(report["depth"].is_null(), "unknown, never 0: {report}");
    assert!(report["unacked"].is_null(), "unknown, never 0: {report}");
    assert_eq!(report["management_api"], false);
    let note = report["notes"][0].as_str().unwrap();
    assert!(note.contains("management API unavailable"), "{note}");
    assert!(stderr(&output).contains("management API unavailable"));
    cleanup(&queue).await;
}

/// inspect of `queue` through `url` with the management API at `management`, as JSON.
async fn inspect_degraded(url: &str, management: &str, queue: &str, sample: &str) -> Value {
    let output = mqdrain(&[
        "--url",
        url,
        "--management-url",
        management,
        "inspect",
        queue,
        "--output",
        "json",
        "--sample",
        sample,
    ])
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!stderr(&output).contains("Wr0ngPw"), "{}", stderr(&output));
    assert!(!String::from_utf8_lossy(&output.stdout).contains("Wr0ngPw"));
    stdout_json(&output)
}

#[tokio::test]
async fn management_api_refusing_credentials_degrades_to_amqp_and_says_why() {
    let queue = unique("mgmt-401");
    let connection = amqp_connection("test producer").await;
    let channel = connection.create_channel().await.unwrap();
    declare_queue(&channel, &queue, &[]).await;
    publish(&channel, &queue, 9).await;
    let management = management_url().replace("http://", "http://guest:Wr0ngPw@");
    let report = inspect_degraded(&amqp_url(), &management, &queue, "0s").await;
    assert_eq!(report["ready"], 9);
    assert!(report["depth"].is_null(), "{report}");
    assert_eq!(report["management_api"], false);
    let note = report["notes"][0].as_str().unwrap();
    assert!(
        note.contains("refused the credentials of user 'guest'"),
        "{note}"
    );
    assert!(note.contains("monitoring"), "{note}");

    // A user AMQP lets in but the API does not (no tag): the same degradation.
    let user = unique("no-tags");
    put_user(&user, "pw", "").await;
    let url = amqp_url().replace("guest:guest", &format!("{user}:pw"));
    let report = inspect_degraded(&url, &management_url(), &queue, "0s").await;
    assert_eq!(report["ready"], 9);
    assert_eq!(report["management_api"], false);
    let note = report["notes"][0].as_str().unwrap();
    assert!(
        note.contains(&format!("refused the credentials of user '{user}'")),
        "{note}"
    );
    delete_user(&user).await;
    cleanup(&queue).await;
}

#[tokio::test]
async fn management_api_that_does_not_know_the_queue_degrades_instead_of_exit_3() {
    let queue = unique("mgmt-404");
    // A vhost of its own: the API answers 404 (not 400) for unknown paths without '%2f' in them.
    let vhost = unique("vhost");
    put_vhost(&vhost).await;
    let url = amqp_url().replace("/%2f", &format!("/{vhost}"));
    let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    declare_queue(&channel, &queue, &[]).await;
    publish(&channel, &queue, 4).await;
    // Another path on the same server, as if the API were another broker's: every request is a 404.
    let management = format!("{}/elsewhere", management_url());
    let report = inspect_degraded(&url, &management, &queue, "0s").await;
    assert_eq!(report["ready"], 4);
    assert_eq!(report["management_api"], false);
    let note = report["notes"][0].as_str().unwrap();
    assert!(note.contains("although AMQP found it"), "{note}");
    let _ = connection.close(200, "bye".into()).await;
    delete_vhost(&vhost).await;
}

#[tokio::test]
async fn management_api_failing_while_sampling_keeps_what_was_seen() {
    let queue = unique("mgmt-midway");
    let connection = amqp_connection("test producer").await;
    let channel = connection.create_channel().await.unwrap();
    declare_queue(&channel, &queue, &[]).await;
    publish(&channel, &queue, 6).await;
    inspect_when_depth(&queue, 6, &["--sample", "0s"]).await;
    let user = unique("midway");
    put_user(&user, "pw", "monitoring").await;
    let url = amqp_url().replace("guest:guest", &format!("{user}:pw"));
    let inspect = tokio::spawn({
        let queue = queue.clone();
        async move { inspect_degraded(&url, &management_url(), &queue, "10s").await }
    });
    // Once inspect is connected its first management request follows at once; a second later
    // it is sampling, and the API refuses the user from the next request on.
    wait_for_connection(&format!("mqdrain inspect {queue}")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    put_user(&user, "changed", "monitoring").await;
    let report = inspect.await.unwrap();
    assert_eq!(report["depth"], 6, "{report}");
    assert_eq!(report["management_api"], true);
    let note = report["notes"][0].as_str().unwrap();
    assert!(
        note.contains("the management API failed while sampling"),
        "{note}"
    );
    assert!(note.contains(&format!("user '{user}'")), "{note}");
    delete_user(&user).await;
    cleanup(&queue).await;
}
