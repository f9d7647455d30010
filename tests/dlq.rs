//! `dlq inspect` and `dlq replay` against real brokers. The RabbitMQ DLQ is filled by RabbitMQ
//! itself: messages rejected by a consumer (basic.reject, requeue=false), expired (x-message-ttl)
//! and pushed out of a full queue (x-max-length, drop-head), all dead-lettered into one DLQ.

mod common;

use common::*;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ExchangeKind};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

const QUIET: Duration = Duration::from_secs(2);

async fn run(args: &[&str]) -> std::process::Output {
    let url = amqp_url();
    let mut full = vec!["--url", url.as_str()];
    full.extend_from_slice(args);
    mqdrain(&full).await
}

/// Runs mqdrain with `--output json` and returns its result document; panics on failure.
async fn run_json(url: &str, args: &[&str]) -> Value {
    let mut full = vec!["--url", url, "--output", "json"];
    full.extend_from_slice(args);
    let output = mqdrain(&full).await;
    assert!(
        output.status.success(),
        "mqdrain {args:?} failed ({:?}): {}",
        output.status.code(),
        stderr(&output)
    );
    stdout_json(&output)
}

fn counts(document: &Value, field: &str) -> BTreeMap<String, u64> {
    document[field]
        .as_object()
        .unwrap_or_else(|| panic!("{field} is an object: {document}"))
        .iter()
        .map(|(key, value)| (key.clone(), value.as_u64().unwrap_or_default()))
        .collect()
}

fn map(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), *value))
        .collect()
}

/// Ready messages right now (a passive declare counts in real time, unlike the management API).
async fn ready(connection: &Connection, queue: &str) -> u32 {
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue exists");
    let _ = channel.close(200, "done".into()).await;
    declared.message_count()
}

async fn wait_ready(connection: &Connection, queue: &str, expected: u32) {
    eventually(
        Duration::from_secs(20),
        &format!("{expected} ready messages in '{queue}'"),
        || async {
            let now = ready(connection, queue).await;
            if now == expected {
                Ok(())
            } else {
                Err(format!("{now} ready"))
            }
        },
    )
    .await;
}

fn header<'a>(delivery: &'a Delivery, name: &str) -> Option<&'a AMQPValue> {
    delivery.properties.headers().as_ref()?.inner().get(name)
}

fn header_text(delivery: &Delivery, name: &str) -> Option<String> {
    match header(delivery, name)? {
        AMQPValue::LongString(text) => Some(text.to_string()),
        AMQPValue::ShortString(text) => Some(text.to_string()),
        _ => None,
    }
}

fn header_int(delivery: &Delivery, name: &str) -> Option<i64> {
    match header(delivery, name)? {
        AMQPValue::LongLongInt(value) => Some(*value),
        AMQPValue::LongInt(value) => Some(i64::from(*value)),
        _ => None,
    }
}

/// The reason of the latest death in `x-death`.
fn death_reason(delivery: &Delivery) -> Option<String> {
    match header(delivery, "x-death")? {
        AMQPValue::FieldArray(entries) => match entries.as_slice().first()? {
            AMQPValue::FieldTable(entry) => match entry.inner().get("reason")? {
                AMQPValue::LongString(text) => Some(text.to_string()),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    }
}

/// A DLQ that RabbitMQ filled: 3 rejected, 4 expired and 3 pushed out by max-length, each
/// published through a direct exchange with its own routing key and a full set of properties.
struct Fixture {
    connection: Connection,
    exchange: String,
    dlq: String,
    rejecting: String,
    expiring: String,
    bounded: String,
    /// Replay targets the test declared.
    extra: Vec<String>,
}

const REJECTED: u32 = 3;
const EXPIRED: u32 = 4;
const MAXLEN: u32 = 3;
const DEAD: u32 = REJECTED + EXPIRED + MAXLEN;

impl Fixture {
    async fn new(prefix: &str) -> Fixture {
        let base = unique(prefix);
        let connection = amqp_connection("test dlq setup").await;
        let channel = connection.create_channel().await.unwrap();
        let fixture = Fixture {
            exchange: format!("{base}.in"),
            dlq: format!("{base}.dlq"),
            rejecting: format!("{base}.rejecting"),
            expiring: format!("{base}.expiring"),
            bounded: format!("{base}.bounded"),
            extra: Vec::new(),
            connection,
        };
        channel
            .exchange_declare(
                fixture.exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        declare_queue(&channel, &fixture.dlq, &[]).await;
        // The default exchange as DLX: dead letters go straight to the DLQ by its name.
        let dead_letter = |extra: &[(&'static str, AMQPValue)]| {
            let mut arguments = vec![
                ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
                (
                    "x-dead-letter-routing-key",
                    AMQPValue::LongString(fixture.dlq.as_str().into()),
                ),
            ];
            arguments.extend_from_slice(extra);
            arguments
        };
        declare_queue(&channel, &fixture.rejecting, &dead_letter(&[])).await;
        declare_queue(
            &channel,
            &fixture.expiring,
            &dead_letter(&[("x-message-ttl", AMQPValue::LongInt(200))]),
        )
        .await;
        declare_queue(
            &channel,
            &fixture.bounded,
            &dead_letter(&[
                ("x-max-length", AMQPValue::LongInt(2)),
                ("x-overflow", AMQPValue::LongString("drop-head".into())),
            ]),
        )
        .await;
        for (queue, key) in [
            (&fixture.rejecting, "order.rejected"),
            (&fixture.expiring, "order.expired"),
            (&fixture.bounded, "order.maxlen"),
        ] {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    fixture.exchange.as_str().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let mut index = 0;
        for (key, count) in [
            ("order.rejected", REJECTED),
            ("order.expired", EXPIRED),
            ("order.maxlen", MAXLEN + 2),
        ] {
            for _ in 0..count {
                let confirm = channel
                    .basic_publish(
                        fixture.exchange.as_str().into(),
                        key.into(),
                        BasicPublishOptions::default(),
                        format!("{{\"order\":{index}}}").as_bytes(),
                        properties(index),
                    )
                    .await
                    .unwrap();
                assert!(confirm.await.unwrap().is_ack());
                index += 1;
            }
        }
        // A consumer that rejects everything without requeueing: RabbitMQ dead-letters it.
        channel
            .basic_qos(10, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                fixture.rejecting.as_str().into(),
                "test-rejecter".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        for _ in 0..REJECTED {
            let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("a message to reject")
                .expect("consumer open")
                .expect("delivery");
            channel
                .basic_reject(delivery.delivery_tag, BasicRejectOptions { requeue: false })
                .await
                .unwrap();
        }
        let _ = channel.close(200, "set up".into()).await;
        wait_ready(&fixture.connection, &fixture.dlq, DEAD).await;
        fixture
    }

    async fn queue(&mut self, suffix: &str) -> String {
        let name = format!("{}.{suffix}", self.dlq);
        let channel = self.connection.create_channel().await.unwrap();
        declare_queue(&channel, &name, &[]).await;
        let _ = channel.close(200, "done".into()).await;
        self.extra.push(name.clone());
        name
    }

    /// Publishes one message straight into the DLQ with `x-mqdrain-replays` already at `replays`.
    async fn publish_replayed(&self, replays: i64) {
        let channel = self.connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let mut headers = FieldTable::default();
        headers.insert("x-mqdrain-replays".into(), AMQPValue::LongLongInt(replays));
        headers.insert("tenant".into(), AMQPValue::LongString("t-budget".into()));
        let confirm = channel
            .basic_publish(
                "".into(),
                self.dlq.as_str().into(),
                BasicPublishOptions::default(),
                b"at the budget",
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id("budget".into())
                    .with_headers(headers),
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack());
        let _ = channel.close(200, "done".into()).await;
    }

    async fn cleanup(self) {
        for queue in [&self.dlq, &self.rejecting, &self.expiring, &self.bounded]
            .into_iter()
            .chain(self.extra.iter())
        {
            if let Ok(channel) = self.connection.create_channel().await {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        if let Ok(channel) = self.connection.create_channel().await {
            let _ = channel
                .exchange_delete(
                    self.exchange.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await;
        }
        let _ = self.connection.close(200, "bye".into()).await;
    }
}

fn properties(index: usize) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("tenant".into(), AMQPValue::LongString("t-1".into()));
    headers.insert("seq".into(), AMQPValue::LongLongInt(index as i64));
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(format!("id-{index}").into())
        .with_correlation_id(format!("corr-{index}").into())
        .with_type("order.event".into())
        .with_app_id("orders-api".into())
        .with_priority(4)
        .with_headers(headers)
}

/// The properties `properties(seq)` set are all still there.
fn assert_properties_intact(delivery: &Delivery) {
    let seq = header_int(delivery, "seq").expect("seq header kept");
    let seq = usize::try_from(seq).unwrap();
    let expected = properties(seq);
    let got = &delivery.properties;
    assert_eq!(got.message_id(), expected.message_id());
    assert_eq!(got.correlation_id(), expected.correlation_id());
    assert_eq!(got.content_type(), expected.content_type());
    assert_eq!(got.kind(), expected.kind());
    assert_eq!(got.app_id(), expected.app_id());
    assert_eq!(got.priority(), expected.priority());
    assert_eq!(got.delivery_mode(), &Some(2));
    assert_eq!(header_text(delivery, "tenant").as_deref(), Some("t-1"));
    assert!(header(delivery, "x-death").is_some(), "x-death kept");
    assert_eq!(
        String::from_utf8_lossy(&delivery.data),
        format!("{{\"order\":{seq}}}")
    );
}

#[tokio::test]
async fn inspect_counts_real_dead_letters_and_leaves_every_one_in_place() {
    let fixture = Fixture::new("dlq-inspect").await;
    let url = amqp_url();
    let report = run_json(&url, &["dlq", "inspect", &fixture.dlq]).await;
    assert_eq!(report["broker"], "rabbitmq");
    assert_eq!(report["examined"], DEAD);
    assert_eq!(report["depth"], DEAD);
    assert_eq!(report["complete"], true);
    assert_eq!(
        counts(&report, "by_reason"),
        map(&[
            ("rejected", REJECTED.into()),
            ("expired", EXPIRED.into()),
            ("maxlen", MAXLEN.into())
        ])
    );
    assert_eq!(
        counts(&report, "by_queue"),
        map(&[
            (fixture.rejecting.as_str(), REJECTED.into()),
            (fixture.expiring.as_str(), EXPIRED.into()),
            (fixture.bounded.as_str(), MAXLEN.into())
        ])
    );
    assert_eq!(
        counts(&report, "by_routing_key"),
        map(&[
            ("order.rejected", REJECTED.into()),
            ("order.expired", EXPIRED.into()),
            ("order.maxlen", MAXLEN.into())
        ])
    );
    assert_eq!(report["age"]["buckets"][0]["label"], "<1m");
    assert_eq!(report["age"]["buckets"][0]["count"], DEAD, "{report}");
    assert_eq!(report["age"]["unknown"], 0);

    // Non-destructive: every message is back, in its old order, and a second look sees the same.
    wait_ready(&fixture.connection, &fixture.dlq, DEAD).await;
    let again = run_json(&url, &["dlq", "inspect", &fixture.dlq]).await;
    assert_eq!(again["by_reason"], report["by_reason"]);
    let human = run(&["dlq", "inspect", &fixture.dlq, "--max-messages", "4"]).await;
    assert!(human.status.success(), "{}", stderr(&human));
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("examined 4 of 10 (partial)"), "{text}");
    assert!(text.contains("by reason:"), "{text}");
    assert!(text.contains("WARNING [partial]"), "{text}");
    wait_ready(&fixture.connection, &fixture.dlq, DEAD).await;
    let deliveries = consume_all(&fixture.connection, &fixture.dlq, QUIET).await;
    let ids: Vec<String> = deliveries.iter().map(message_id).collect();
    let mut expected: Vec<String> = (0..REJECTED + EXPIRED)
        .map(|index| format!("id-{index}"))
        .collect();
    // Publishing 5 into a queue of 2 pushed out the first 3 of them.
    expected.extend((0..MAXLEN).map(|index| format!("id-{}", REJECTED + EXPIRED + index)));
    let mut sorted = ids.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected, "every dead letter is still there");
    assert!(
        deliveries.iter().all(|delivery| delivery.redelivered),
        "peeked messages come back flagged redelivered"
    );
    fixture.cleanup().await;
}

#[tokio::test]
async fn replay_republishes_with_the_counter_and_parks_at_the_budget() {
    let mut fixture = Fixture::new("dlq-replay").await;
    fixture.publish_replayed(3).await;
    let target = fixture.queue("target").await;
    let parked = fixture.queue("parked").await;
    let url = amqp_url();
    let outcome = run_json(
        &url,
        &[
            "dlq",
            "replay",
            &fixture.dlq,
            "--to",
            &target,
            "--parking-lot",
            &parked,
            "--max-retries",
            "3",
            "--idle-timeout",
            "1s",
        ],
    )
    .await;
    assert_eq!(outcome["replayed"], DEAD, "{outcome}");
    assert_eq!(outcome["parked"], 1);
    assert_eq!(outcome["skipped_by_filter"], 0);
    assert_eq!(outcome["kept_at_budget"], 0);
    assert_eq!(outcome["result"]["returned_to_source"], 0);
    assert_eq!(ready(&fixture.connection, &fixture.dlq).await, 0);

    let replayed = consume_all(&fixture.connection, &target, QUIET).await;
    assert_eq!(replayed.len() as u32, DEAD);
    for delivery in &replayed {
        assert_eq!(header_int(delivery, "x-mqdrain-replays"), Some(1));
        assert_properties_intact(delivery);
    }
    let parked_messages = consume_all(&fixture.connection, &parked, QUIET).await;
    assert_eq!(parked_messages.len(), 1);
    let parked_message = &parked_messages[0];
    assert_eq!(message_id(parked_message), "budget");
    assert_eq!(
        header_int(parked_message, "x-mqdrain-replays"),
        Some(3),
        "parking does not count as a replay"
    );
    assert_eq!(
        header_text(parked_message, "x-mqdrain-parked-from").as_deref(),
        Some(fixture.dlq.as_str())
    );
    assert_eq!(
        header_text(parked_message, "tenant").as_deref(),
        Some("t-budget")
    );
    fixture.cleanup().await;
}

#[tokio::test]
async fn the_budget_holds_across_rounds_of_dying_again() {
    // The target dead-letters into the DLQ again: round 1 replays (counter 1), the consumer
    // rejects once more, round 2 finds the counter at the budget and parks.
    let mut fixture = Fixture::new("dlq-rounds").await;
    let target = format!("{}.again", fixture.dlq);
    let channel = fixture.connection.create_channel().await.unwrap();
    declare_queue(
        &channel,
        &target,
        &[
            ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString(fixture.dlq.as_str().into()),
            ),
        ],
    )
    .await;
    fixture.extra.push(target.clone());
    let parked = fixture.queue("parked").await;
    let url = amqp_url();
    let replay = |url: String, dlq: String, target: String, parked: String| async move {
        run_json(
            &url,
            &[
                "dlq",
                "replay",
                &dlq,
                "--to",
                &target,
                "--parking-lot",
                &parked,
                "--max-retries",
                "1",
                "--idle-timeout",
                "1s",
            ],
        )
        .await
    };
    let first = replay(
        url.clone(),
        fixture.dlq.clone(),
        target.clone(),
        parked.clone(),
    )
    .await;
    assert_eq!(first["replayed"], DEAD);
    assert_eq!(first["parked"], 0);
    // The application fails again on every message.
    let mut consumer = channel
        .basic_consume(
            target.as_str().into(),
            "test-rejects-again".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..DEAD {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a replayed message")
            .expect("consumer open")
            .expect("delivery");
        channel
            .basic_reject(delivery.delivery_tag, BasicRejectOptions { requeue: false })
            .await
            .unwrap();
    }
    let _ = channel.close(200, "done".into()).await;
    wait_ready(&fixture.connection, &fixture.dlq, DEAD).await;
    let inspected = run_json(&url, &["dlq", "inspect", &fixture.dlq]).await;
    assert_eq!(
        counts(&inspected, "by_reason"),
        map(&[("rejected", DEAD.into())])
    );
    assert_eq!(inspected["by_replays"]["1"], DEAD);
    wait_ready(&fixture.connection, &fixture.dlq, DEAD).await;
    let second = replay(
        url.clone(),
        fixture.dlq.clone(),
        target.clone(),
        parked.clone(),
    )
    .await;
    assert_eq!(second["replayed"], 0);
    assert_eq!(second["parked"], DEAD);
    assert_eq!(ready(&fixture.connection, &target).await, 0);
    let parked_messages = consume_all(&fixture.connection, &parked, QUIET).await;
    assert_eq!(parked_messages.len() as u32, DEAD);
    for delivery in &parked_messages {
        assert_eq!(header_int(delivery, "x-mqdrain-replays"), Some(1));
        assert_properties_intact(delivery);
    }
    fixture.cleanup().await;
}

#[tokio::test]
async fn filter_moves_only_matching_messages_and_leaves_the_rest_in_the_dlq() {
    let mut fixture = Fixture::new("dlq-filter").await;
    let target = fixture.queue("target").await;
    let url = amqp_url();
    let outcome = run_json(
        &url,
        &[
            "dlq",
            "replay",
            &fixture.dlq,
            "--to",
            &target,
            "--filter",
            "reason=expired",
            "--idle-timeout",
            "1s",
            "--confirm-window",
            "2",
        ],
    )
    .await;
    assert_eq!(outcome["replayed"], EXPIRED, "{outcome}");
    assert_eq!(outcome["skipped_by_filter"], REJECTED + MAXLEN);
    assert_eq!(outcome["result"]["skipped"], REJECTED + MAXLEN);
    let replayed = consume_all(&fixture.connection, &target, QUIET).await;
    assert_eq!(replayed.len() as u32, EXPIRED);
    for delivery in &replayed {
        assert_eq!(death_reason(delivery).as_deref(), Some("expired"));
        assert_eq!(header_int(delivery, "x-mqdrain-replays"), Some(1));
        assert_properties_intact(delivery);
    }
    wait_ready(&fixture.connection, &fixture.dlq, REJECTED + MAXLEN).await;
    let left = consume_all(&fixture.connection, &fixture.dlq, QUIET).await;
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for delivery in &left {
        *reasons
            .entry(death_reason(delivery).unwrap_or_default())
            .or_default() += 1;
        assert_eq!(
            header(delivery, "x-mqdrain-replays"),
            None,
            "never replayed"
        );
    }
    assert_eq!(
        reasons,
        map(&[("rejected", REJECTED.into()), ("maxlen", MAXLEN.into())])
    );
    fixture.cleanup().await;
}

#[tokio::test]
async fn filtered_messages_between_replayed_ones_are_never_acknowledged() {
    // 301 messages alternating between two original queues, starting with one the filter
    // leaves: acknowledgements must step around every held message (an ack with `multiple`
    // would remove the held ones below it), across several acknowledgement batches.
    let mut fixture = Fixture::new("dlq-holes").await;
    let mixed = fixture.queue("mixed").await;
    let target = fixture.queue("target").await;
    let channel = fixture.connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let total = 301;
    for index in 0..total {
        let origin = if index % 2 == 0 { "kept" } else { "moved" };
        let mut headers = FieldTable::default();
        headers.insert(
            "x-first-death-queue".into(),
            AMQPValue::LongString(origin.into()),
        );
        let confirm = channel
            .basic_publish(
                "".into(),
                mixed.as_str().into(),
                BasicPublishOptions::default(),
                b"x",
                BasicProperties::default()
                    .with_message_id(format!("{origin}-{index}").into())
                    .with_headers(headers),
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack());
    }
    let _ = channel.close(200, "done".into()).await;
    let url = amqp_url();
    let outcome = run_json(
        &url,
        &[
            "dlq",
            "replay",
            &mixed,
            "--to",
            &target,
            "--filter",
            "queue=moved",
            "--idle-timeout",
            "1s",
        ],
    )
    .await;
    assert_eq!(outcome["replayed"], 150, "{outcome}");
    assert_eq!(outcome["skipped_by_filter"], 151);
    wait_ready(&fixture.connection, &mixed, 151).await;
    let left = consume_all(&fixture.connection, &mixed, QUIET).await;
    assert_eq!(left.len(), 151);
    assert!(left.iter().all(|d| message_id(d).starts_with("kept-")));
    let ids: Vec<String> = left.iter().map(message_id).collect();
    let in_order: Vec<String> = (0..total)
        .step_by(2)
        .map(|index| format!("kept-{index}"))
        .collect();
    assert_eq!(ids, in_order, "requeued in their old places, in order");
    let moved = consume_all(&fixture.connection, &target, QUIET).await;
    assert_eq!(moved.len(), 150);
    assert!(moved.iter().all(|d| message_id(d).starts_with("moved-")));
    fixture.cleanup().await;
}

#[tokio::test]
async fn dry_run_plans_destinations_and_moves_nothing() {
    let mut fixture = Fixture::new("dlq-dry").await;
    fixture.publish_replayed(5).await;
    let target = fixture.queue("target").await;
    let parked = fixture.queue("parked").await;
    let url = amqp_url();
    let outcome = run_json(
        &url,
        &[
            "dlq",
            "replay",
            &fixture.dlq,
            "--to",
            &target,
            "--parking-lot",
            &parked,
            "--filter",
            "reason=expired,(none)",
            "--dry-run",
        ],
    )
    .await;
    assert_eq!(outcome["dry_run"], true);
    assert_eq!(outcome["examined"], DEAD + 1);
    assert_eq!(outcome["replayed"], EXPIRED, "{outcome}");
    assert_eq!(
        outcome["parked"], 1,
        "the message without x-death, at the budget"
    );
    assert_eq!(outcome["skipped_by_filter"], REJECTED + MAXLEN);
    assert!(outcome["result"].is_null());
    wait_ready(&fixture.connection, &fixture.dlq, DEAD + 1).await;
    assert_eq!(ready(&fixture.connection, &target).await, 0);
    assert_eq!(ready(&fixture.connection, &parked).await, 0);

    // Without a parking lot, the message at the budget stays in the DLQ.
    let outcome = run_json(
        &url,
        &[
            "dlq",
            "replay",
            &fixture.dlq,
            "--to",
            &target,
            "--idle-timeout",
            "1s",
        ],
    )
    .await;
    assert_eq!(outcome["replayed"], DEAD);
    assert_eq!(outcome["kept_at_budget"], 1);
    wait_ready(&fixture.connection, &fixture.dlq, 1).await;
    let human = run(&["dlq", "replay", &fixture.dlq, "--to", &target, "--dry-run"]).await;
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("dry run: nothing was moved"), "{text}");
    assert!(text.contains("would leave"), "{text}");
    fixture.cleanup().await;
}

#[tokio::test]
async fn refusals_name_the_object_and_the_next_step() {
    let fixture = Fixture::new("dlq-refuse").await;
    let missing = format!("{}.missing", fixture.dlq);
    let output = run(&["dlq", "replay", &fixture.dlq, "--to", &missing]).await;
    assert_eq!(output.status.code(), Some(3));
    let text = stderr(&output);
    assert!(text.contains(&missing) && text.contains("--to"), "{text}");
    let output = run(&["dlq", "replay", &fixture.dlq, "--to", &fixture.dlq]).await;
    assert_eq!(output.status.code(), Some(2));
    let output = run(&[
        "dlq",
        "replay",
        &fixture.dlq,
        "--to",
        &fixture.rejecting,
        "--filter",
        "colour=red",
    ])
    .await;
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("reason, queue or routing-key"));
    let output = run(&["dlq", "inspect", &fixture.dlq, "--max-messages", "70000"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("65535"), "{}", stderr(&output));
    wait_ready(&fixture.connection, &fixture.dlq, DEAD).await;
    fixture.cleanup().await;
}

#[tokio::test]
async fn the_shipped_playbook_replays_with_a_dlq_replay_step() {
    let mut fixture = Fixture::new("dlq-playbook").await;
    let target = fixture.queue("target").await;
    let parked = fixture.queue("parked").await;
    let playbook = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("playbooks")
        .join("rabbitmq-dlq-replay.yaml");
    let state = std::env::temp_dir().join(format!("{}.state.json", fixture.dlq));
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mqdrain"))
        .args([
            "playbook",
            "run",
            &playbook.display().to_string(),
            "--yes",
            "--output",
            "json",
            "--state",
            &state.display().to_string(),
            "--var",
            &format!("dlq={}", fixture.dlq),
            "--var",
            &format!("to={target}"),
            "--var",
            &format!("parking_lot={parked}"),
            "--var",
            "reason=expired",
        ])
        .env("MQDRAIN_URL", amqp_url())
        .env("MQDRAIN_MANAGEMENT_URL", management_url())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("the mqdrain binary runs");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let outcome = stdout_json(&output);
    let steps = outcome["steps"].as_array().expect("steps");
    assert!(
        steps.iter().all(|step| step["outcome"] == "ok"),
        "{outcome:#}"
    );
    let replay = &steps[2];
    assert_eq!(replay["operation"], "dlq-replay");
    assert_eq!(replay["result"]["replayed"], EXPIRED, "{replay:#}");
    assert_eq!(replay["result"]["skipped_by_filter"], REJECTED + MAXLEN);
    assert_eq!(ready(&fixture.connection, &target).await, EXPIRED);
    wait_ready(&fixture.connection, &fixture.dlq, REJECTED + MAXLEN).await;
    let _ = std::fs::remove_file(state);

    // `playbook check` catches a replay into the DLQ itself, at the step's line.
    let bad = std::env::temp_dir().join(format!("{}.yaml", fixture.dlq));
    std::fs::write(
        &bad,
        "name: bad\nsteps:\n  - dlq-replay:\n      name: d\n      to: d\n",
    )
    .unwrap();
    let output = mqdrain(&["playbook", "check", &bad.display().to_string()]).await;
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(
        text.contains(":3:") && text.contains("the dead-letter queue itself"),
        "{text}"
    );
    let _ = std::fs::remove_file(bad);
    fixture.cleanup().await;
}

mod kafka_dlq {
    //! A Kafka dead-letter topic written by the test's own producer, with a reason header.

    use super::*;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::ClientConfig;
    use rdkafka::{Offset, TopicPartitionList};

    fn config() -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", kafka_bootstrap())
            .set("log_level", "3");
        config
    }

    async fn produce(topic: &str, records: &[(i32, &str, &str, Option<&str>)]) {
        let producer: FutureProducer = config().create().expect("producer");
        for (index, (partition, key, reason, replays)) in records.iter().enumerate() {
            let mut headers = OwnedHeaders::new()
                .insert(Header {
                    key: "x-death-reason",
                    value: Some(*reason),
                })
                .insert(Header {
                    key: "trace",
                    value: Some(&format!("t-{index}")),
                });
            if let Some(replays) = replays {
                headers = headers.insert(Header {
                    key: "x-mqdrain-replays",
                    value: Some(*replays),
                });
            }
            let payload = format!("p-{index}");
            producer
                .send(
                    FutureRecord::to(topic)
                        .partition(*partition)
                        .key(*key)
                        .payload(&payload)
                        .headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .expect("delivered");
        }
    }

    /// (key, payload, headers) of every record of a 1-partition topic.
    fn read(topic: &str, expected: usize) -> Vec<(String, String, BTreeMap<String, String>)> {
        let consumer: BaseConsumer = config()
            .set("group.id", unique("test-reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&list).unwrap();
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    let headers = message
                        .headers()
                        .map(|headers| {
                            headers
                                .iter()
                                .map(|header| {
                                    (
                                        header.key.to_string(),
                                        String::from_utf8_lossy(header.value.unwrap_or_default())
                                            .into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    seen.push((
                        String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                        String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned(),
                        headers,
                    ));
                }
                _ if seen.len() >= expected => break,
                _ => {}
            }
        }
        // A short extra wait so an unexpected extra record shows up too.
        while let Some(Ok(message)) = consumer.poll(Duration::from_millis(500)) {
            seen.push((
                String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                String::new(),
                BTreeMap::new(),
            ));
        }
        seen
    }

    #[tokio::test]
    async fn inspect_counts_by_reason_header_and_replay_moves_and_parks() {
        let dlq = unique("kdlq");
        let target = format!("{dlq}.target");
        let parked = format!("{dlq}.parked");
        common::kafka::create_topic(&dlq, 2, &[]).await;
        common::kafka::create_topic(&target, 1, &[]).await;
        common::kafka::create_topic(&parked, 1, &[]).await;
        produce(
            &dlq,
            &[
                (0, "a", "poison", None),
                (0, "b", "poison", None),
                (0, "c", "timeout", None),
                (1, "d", "poison", Some("1")),
                (1, "e", "timeout", None),
                (1, "f", "poison", Some("3")),
            ],
        )
        .await;
        let url = kafka_url();
        let report = run_json(&url, &["dlq", "inspect", &dlq]).await;
        assert_eq!(report["broker"], "kafka");
        assert_eq!(report["examined"], 6, "{report}");
        assert_eq!(report["complete"], true);
        assert_eq!(
            counts(&report, "by_reason"),
            map(&[("poison", 4), ("timeout", 2)])
        );
        assert_eq!(counts(&report, "by_partition"), map(&[("0", 3), ("1", 3)]));
        assert_eq!(report["age"]["buckets"][0]["count"], 6);

        let group = unique("kdlq-replay");
        let dry = run_json(
            &url,
            &[
                "dlq",
                "replay",
                &dlq,
                "--to",
                &target,
                "--parking-lot",
                &parked,
                "--group",
                &group,
                "--dry-run",
            ],
        )
        .await;
        assert_eq!(dry["replayed"], 5, "{dry}");
        assert_eq!(dry["parked"], 1);
        assert!(read(&target, 0).is_empty(), "the dry run produced nothing");

        let outcome = run_json(
            &url,
            &[
                "dlq",
                "replay",
                &dlq,
                "--to",
                &target,
                "--parking-lot",
                &parked,
                "--group",
                &group,
                "--idle-timeout",
                "2s",
            ],
        )
        .await;
        assert_eq!(outcome["replayed"], 5, "{outcome}");
        assert_eq!(outcome["parked"], 1);
        let replayed = read(&target, 5);
        assert_eq!(replayed.len(), 5, "{replayed:?}");
        for (key, payload, headers) in &replayed {
            let expected = if key == "d" { "2" } else { "1" };
            assert_eq!(
                headers.get("x-mqdrain-replays").map(String::as_str),
                Some(expected)
            );
            assert!(headers.contains_key("x-death-reason"), "{headers:?}");
            assert!(headers
                .get("trace")
                .is_some_and(|trace| trace.starts_with("t-")));
            assert!(payload.starts_with("p-"));
        }
        let parked_records = read(&parked, 1);
        assert_eq!(parked_records.len(), 1);
        assert_eq!(parked_records[0].0, "f");
        assert_eq!(parked_records[0].2.get("x-mqdrain-parked-from"), Some(&dlq));
        // A rerun under the same group finds nothing new.
        let rerun = run_json(
            &url,
            &[
                "dlq",
                "replay",
                &dlq,
                "--to",
                &target,
                "--group",
                &group,
                "--idle-timeout",
                "2s",
            ],
        )
        .await;
        assert_eq!(rerun["replayed"], 0, "{rerun}");

        // A filtered replay under a new group moves only the matching records.
        let filtered_target = format!("{dlq}.timeouts");
        common::kafka::create_topic(&filtered_target, 1, &[]).await;
        let filtered = run_json(
            &url,
            &[
                "dlq",
                "replay",
                &dlq,
                "--to",
                &filtered_target,
                "--group",
                &unique("kdlq-filter"),
                "--filter",
                "reason=timeout",
                "--idle-timeout",
                "2s",
            ],
        )
        .await;
        assert_eq!(filtered["replayed"], 2, "{filtered}");
        assert_eq!(filtered["skipped_by_filter"], 4);
        assert_eq!(read(&filtered_target, 2).len(), 2);
    }

    #[tokio::test]
    async fn kafka_replay_needs_a_group_and_reason_filters_only() {
        let url = kafka_url();
        let output = mqdrain(&["--url", &url, "dlq", "replay", "d", "--to", "t"]).await;
        assert_eq!(output.status.code(), Some(2));
        assert!(stderr(&output).contains("--group"), "{}", stderr(&output));
        let output = mqdrain(&[
            "--url",
            &url,
            "dlq",
            "replay",
            "d",
            "--to",
            "t",
            "--group",
            "g",
            "--filter",
            "queue=orders",
        ])
        .await;
        assert_eq!(output.status.code(), Some(2));
        assert!(
            stderr(&output).contains("RabbitMQ only"),
            "{}",
            stderr(&output)
        );
    }
}

/// Publishes one message per `(message-id, x-mqdrain-replays)` into `queue`, with confirms.
async fn publish_dead_letters(connection: &Connection, queue: &str, letters: &[(&str, i64)]) {
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for (id, replays) in letters {
        let mut headers = FieldTable::default();
        if *replays > 0 {
            headers.insert("x-mqdrain-replays".into(), AMQPValue::LongLongInt(*replays));
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                id.as_bytes(),
                BasicProperties::default()
                    .with_message_id((*id).into())
                    .with_delivery_mode(2)
                    .with_headers(headers),
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack());
    }
    let _ = channel.close(200, "published".into()).await;
}

#[tokio::test]
async fn replay_with_dedup_suppresses_a_second_copy_of_the_same_replay_only() {
    let connection = amqp_connection("test dlq dedup").await;
    let channel = connection.create_channel().await.unwrap();
    let dlq = unique("dlq-dedup");
    let target = format!("{dlq}.target");
    declare_queue(&channel, &dlq, &[]).await;
    declare_queue(&channel, &target, &[]).await;
    // "a" twice as the same dead letter (a replay that died between confirm and ack leaves the
    // copy behind), "b", and "a" dead-lettered again after one replay: that one must go again.
    publish_dead_letters(&connection, &dlq, &[("a", 0), ("a", 0), ("b", 0), ("a", 1)]).await;
    let url = amqp_url();
    let redis = redis_url();
    let args = [
        "dlq",
        "replay",
        &dlq,
        "--to",
        &target,
        "--dedup",
        &redis,
        "--idle-timeout",
        "1s",
    ];
    let first = run_json(&url, &args).await;
    assert_eq!(first["replayed"], 3, "{first:#}");
    assert_eq!(first["result"]["duplicates_suppressed"], 1, "{first:#}");
    assert!(
        first["actions"].to_string().contains("x-mqdrain-replays"),
        "the plan says what the key counts: {first:#}"
    );
    assert!(
        !first["actions"].to_string().contains("stamping"),
        "replay stamps no id, and its plan does not claim to: {first:#}"
    );
    let mut replayed: Vec<(String, Option<i64>)> = consume_all(&connection, &target, QUIET)
        .await
        .iter()
        .map(|delivery| {
            (
                message_id(delivery),
                header_int(delivery, "x-mqdrain-replays"),
            )
        })
        .collect();
    replayed.sort();
    assert_eq!(
        replayed,
        vec![
            ("a".to_string(), Some(1)),
            ("a".to_string(), Some(2)),
            ("b".to_string(), Some(1)),
        ]
    );
    assert_eq!(
        ready(&connection, &dlq).await,
        0,
        "the suppressed copy is acked"
    );

    // The same dead letter once more, later: still a duplicate while Redis remembers it.
    publish_dead_letters(&connection, &dlq, &[("b", 0)]).await;
    let second = run_json(&url, &args).await;
    assert_eq!(second["replayed"], 0, "{second:#}");
    assert_eq!(second["result"]["duplicates_suppressed"], 1, "{second:#}");
    assert_eq!(ready(&connection, &target).await, 0);

    for queue in [&dlq, &target] {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "done".into()).await;
}
