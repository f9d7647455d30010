//! Shared helpers for the integration tests: broker addresses, unique names, a real "other
//! application" (lapin / rdkafka clients of the test's own), and running the mqdrain binary.
#![allow(dead_code)] // each test crate uses a different subset of these helpers

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;
use std::future::Future;
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn port(var: &str, default: u16) -> u16 {
    std::env::var(var)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

pub fn amqp_url() -> String {
    format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        port("MQDRAIN_AMQP_PORT", 5672)
    )
}

pub fn management_url() -> String {
    format!("http://127.0.0.1:{}", port("MQDRAIN_HTTP_PORT", 15672))
}

pub fn kafka_bootstrap() -> String {
    format!("127.0.0.1:{}", port("MQDRAIN_KAFKA_PORT", 9092))
}

pub fn kafka_url() -> String {
    format!("kafka://{}", kafka_bootstrap())
}

/// A queue/topic/group name no other test run uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "test-{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs the mqdrain binary to completion.
pub async fn mqdrain(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_mqdrain"))
        .args(args)
        .env_remove("MQDRAIN_URL")
        .env_remove("MQDRAIN_MANAGEMENT_URL")
        .output()
        .await
        .expect("the mqdrain binary runs")
}

pub fn stdout_json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "stdout is not one JSON document ({error}).\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match check().await {
            Ok(value) => return value,
            Err(reason) => last = reason,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("timed out waiting for {what}; last state: {last}");
}

pub async fn amqp_connection(name: &str) -> Connection {
    Connection::connect(
        &amqp_url(),
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
    .expect("the test's own AMQP connection opens")
}

/// Declares a durable classic queue with the given x-arguments (integers or strings).
pub async fn declare_queue(channel: &Channel, queue: &str, arguments: &[(&str, AMQPValue)]) {
    let mut table = FieldTable::default();
    for (key, value) in arguments {
        table.insert((*key).into(), value.clone());
    }
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            table,
        )
        .await
        .expect("queue declares");
}

/// Publishes `count` persistent messages with confirms; returns how many the broker acked.
pub async fn publish(channel: &Channel, queue: &str, count: usize) -> usize {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let mut confirms = Vec::with_capacity(count);
    for index in 0..count {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("m-{index}").into());
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                format!("payload {index}").as_bytes(),
                properties,
            )
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    let mut acked = 0;
    for confirm in confirms {
        if confirm.await.expect("confirm arrives").is_ack() {
            acked += 1;
        }
    }
    acked
}

/// PUT a policy through the management API (the test's own HTTP client).
pub async fn put_policy(name: &str, pattern: &str, definition: Value) {
    let response = reqwest::Client::new()
        .put(format!("{}/api/policies/%2f/{name}", management_url()))
        .basic_auth("guest", Some("guest"))
        .json(&serde_json::json!({
            "pattern": pattern,
            "definition": definition,
            "apply-to": "queues",
            "priority": 10,
        }))
        .send()
        .await
        .expect("policy request");
    assert!(
        response.status().is_success(),
        "policy PUT: {}",
        response.status()
    );
}

pub async fn delete_policy(name: &str) {
    let _ = reqwest::Client::new()
        .delete(format!("{}/api/policies/%2f/{name}", management_url()))
        .basic_auth("guest", Some("guest"))
        .send()
        .await;
}
