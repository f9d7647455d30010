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

pub fn redis_url() -> String {
    format!("redis://127.0.0.1:{}/", port("MQDRAIN_REDIS_PORT", 6379))
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

/// The mqdrain binary, aimed at the test brokers: no MQDRAIN_URL from the caller's shell, and
/// the test broker's management API (MQDRAIN_HTTP_PORT) unless the command talks to Kafka,
/// where a management URL is a usage error. An explicit --management-url still wins.
pub fn mqdrain_command<S: AsRef<str>>(args: &[S]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mqdrain"));
    command.env_remove("MQDRAIN_URL");
    if args.iter().any(|arg| arg.as_ref().starts_with("kafka://")) {
        command.env_remove("MQDRAIN_MANAGEMENT_URL");
    } else {
        command.env("MQDRAIN_MANAGEMENT_URL", management_url());
    }
    command.args(args.iter().map(AsRef::as_ref));
    command
}

/// Runs the mqdrain binary to completion.
pub async fn mqdrain(args: &[&str]) -> Output {
    mqdrain_command(args)
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

/// The error line of a failed run, after asserting the exit code, that the error is one line
/// (`mqdrain: error: ...`) and that nothing panicked.
pub fn error_line(output: &Output, code: i32) -> String {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(code), "stderr: {text}");
    assert!(
        !text.contains("panicked") && !text.contains("RUST_BACKTRACE"),
        "{text}"
    );
    let errors: Vec<&str> = text.lines().filter(|line| line.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {text}");
    assert!(errors[0].starts_with("mqdrain: error: "), "{text}");
    errors[0].to_string()
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

/// PUT `body` to the management API path `path` (after `/api/`), as guest; panics unless it succeeds.
pub async fn api_put(path: &str, body: Value) {
    let response = reqwest::Client::new()
        .put(format!("{}/api/{path}", management_url()))
        .basic_auth("guest", Some("guest"))
        .json(&body)
        .send()
        .await
        .expect("management request");
    assert!(
        response.status().is_success(),
        "PUT {path}: {}",
        response.status()
    );
}

/// DELETE a management API path, as guest; a missing object is fine.
pub async fn api_delete(path: &str) {
    let _ = reqwest::Client::new()
        .delete(format!("{}/api/{path}", management_url()))
        .basic_auth("guest", Some("guest"))
        .send()
        .await;
}

/// PUT a policy through the management API (the test's own HTTP client).
pub async fn put_policy(name: &str, pattern: &str, definition: Value) {
    put_policy_of("policies", name, pattern, definition).await;
}

/// PUT an operator policy: limits the administrator imposes over the users' own policies.
pub async fn put_operator_policy(name: &str, pattern: &str, definition: Value) {
    put_policy_of("operator-policies", name, pattern, definition).await;
}

pub async fn delete_operator_policy(name: &str) {
    api_delete(&format!("operator-policies/%2f/{name}")).await;
}

async fn put_policy_of(kind: &str, name: &str, pattern: &str, definition: Value) {
    api_put(
        &format!("{kind}/%2f/{name}"),
        serde_json::json!({
            "pattern": pattern,
            "definition": definition,
            "apply-to": "queues",
            "priority": 10,
        }),
    )
    .await;
}

pub async fn delete_policy(name: &str) {
    api_delete(&format!("policies/%2f/{name}")).await;
}

/// Creates (or resets) a user with `tags` and full permissions on vhost `/`, as guest.
pub async fn put_user(name: &str, password: &str, tags: &str) {
    api_put(
        &format!("users/{name}"),
        serde_json::json!({"password": password, "tags": tags}),
    )
    .await;
    api_put(&format!("permissions/%2f/{name}"), full_permissions()).await;
}

pub async fn delete_user(name: &str) {
    api_delete(&format!("users/{name}")).await;
}

/// Creates a vhost, as guest, and gives guest full permissions on it.
pub async fn put_vhost(name: &str) {
    api_put(&format!("vhosts/{name}"), serde_json::json!({})).await;
    api_put(&format!("permissions/{name}/guest"), full_permissions()).await;
}

pub async fn delete_vhost(name: &str) {
    api_delete(&format!("vhosts/{name}")).await;
}

fn full_permissions() -> Value {
    serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"})
}

/// Waits until the management API lists a client connection named `name`.
pub async fn wait_for_connection(name: &str) {
    eventually(
        Duration::from_secs(30),
        &format!("connection '{name}'"),
        || async {
            let connections: Value = reqwest::Client::new()
                .get(format!("{}/api/connections", management_url()))
                .basic_auth("guest", Some("guest"))
                .send()
                .await
                .map_err(|error| error.to_string())?
                .json()
                .await
                .map_err(|error| error.to_string())?;
            let named = connections.as_array().is_some_and(|list| {
                list.iter()
                    .any(|c| c["client_properties"]["connection_name"] == name)
            });
            if named {
                Ok(())
            } else {
                Err("not listed yet".to_string())
            }
        },
    )
    .await;
}

pub mod kafka {
    //! The test's own Kafka clients: topic creation, a producer, a group that commits.

    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{Offset, TopicPartitionList};
    use std::time::Duration;

    fn config() -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", super::kafka_bootstrap());
        config
    }

    pub async fn create_topic(topic: &str, partitions: i32, configs: &[(&str, &str)]) {
        let admin: AdminClient<DefaultClientContext> = config().create().expect("admin client");
        let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        for (key, value) in configs {
            new_topic = new_topic.set(key, value);
        }
        let results = admin
            .create_topics([&new_topic], &AdminOptions::new())
            .await
            .expect("create topics request");
        for result in results {
            result.expect("topic created");
        }
    }

    /// Produces `count` keyed messages into one partition; returns once all are delivered.
    pub async fn produce(topic: &str, partition: i32, count: usize) {
        let producer: FutureProducer = config()
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()
            .expect("producer");
        let mut deliveries = Vec::with_capacity(count);
        for index in 0..count {
            let key = format!("key-{}", index % 7);
            let payload = format!("p{partition}-m{index}");
            let record = FutureRecord::to(topic)
                .partition(partition)
                .key(&key)
                .payload(&payload);
            deliveries.push(
                producer
                    .send_result(record)
                    .map_err(|(error, _)| error)
                    .expect("enqueue"),
            );
        }
        for delivery in deliveries {
            delivery.await.expect("delivery").expect("delivered");
        }
    }

    /// A live member of `group`: consumes `topic` at about `per_second`, committing as it goes,
    /// until the task is aborted.
    pub fn paced_member(topic: &str, group: &str, per_second: u64) -> tokio::task::JoinHandle<()> {
        use rdkafka::consumer::StreamConsumer;
        let consumer: StreamConsumer = config()
            .set("group.id", group)
            .set("client.id", "test-paced-member")
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "200")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        let pause = Duration::from_millis(1000 / per_second);
        tokio::spawn(async move {
            while consumer.recv().await.is_ok() {
                tokio::time::sleep(pause).await;
            }
        })
    }

    /// Commits `offsets[p]` for partition p under `group`, from a client that never joins it.
    pub fn commit(group: &str, topic: &str, offsets: &[i64]) {
        let consumer: BaseConsumer = config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut list = TopicPartitionList::new();
        for (partition, offset) in offsets.iter().enumerate() {
            list.add_partition_offset(topic, partition as i32, Offset::Offset(*offset))
                .expect("offset");
        }
        consumer.commit(&list, CommitMode::Sync).expect("commit");
    }

    /// Deletes records below `offset` in partition 0 (advances the low watermark).
    pub async fn delete_records_before(
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> = config().create().expect("admin client");
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, partition, Offset::Offset(offset))
            .expect("offset");
        admin
            .delete_records(
                &list,
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map(|_| ())
            .map_err(|error| error.to_string())
    }
}

/// Consumes a queue until it stays empty for `quiet`, acking everything; returns the deliveries.
pub async fn consume_all(
    connection: &Connection,
    queue: &str,
    quiet: Duration,
) -> Vec<lapin::message::Delivery> {
    use futures_util::StreamExt;
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_qos(1000, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            format!("test-drain-{queue}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut deliveries = Vec::new();
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout(quiet, consumer.next()).await {
        channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await
            .expect("ack");
        deliveries.push(delivery);
    }
    let _ = channel.close(200, "done".into()).await;
    deliveries
}

/// The `message-id` property of a delivery.
pub fn message_id(delivery: &lapin::message::Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string())
        .unwrap_or_default()
}

/// Management API view of a queue (None when it does not exist).
pub async fn queue_info(queue: &str) -> Option<Value> {
    let response = reqwest::Client::new()
        .get(format!("{}/api/queues/%2f/{queue}", management_url()))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("management request");
    if response.status().as_u16() == 404 {
        return None;
    }
    Some(response.json().await.expect("queue JSON"))
}
