//! Building rdkafka clients from a `KafkaTarget`, and mapping librdkafka errors to ours.

use crate::endpoint::KafkaTarget;
use crate::error::{Error, Result};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use std::time::Duration;

const SERVICE: &str = "Kafka";
/// How long one metadata/offset request may take before the broker counts as unreachable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub fn base_config(target: &KafkaTarget, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &target.bootstrap_servers)
        .set("client.id", client_id)
        // Fail fast on a wrong address instead of librdkafka's minute-long default.
        .set("socket.connection.setup.timeout.ms", "5000")
        .set("log_level", "3");
    for (key, value) in &target.client_config {
        config.set(key, value);
    }
    config
}

/// An idempotent producer whose deliveries are confirmed once every in-sync replica has the
/// record (acks=all): what the forwarder and the DLQ replay publish with. A refused delivery comes
/// back within `message.timeout.ms`, and the loop retries it. `extra` settings come last.
pub fn confirming_producer(
    target: &KafkaTarget,
    client_id: &str,
    role: &str,
    extra: &[(&str, &str)],
) -> Result<FutureProducer> {
    let mut config = base_config(target, client_id);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000");
    for (key, value) in extra {
        config.set(*key, *value);
    }
    config
        .create()
        .map_err(|error| client_setup_error(target, &format!("{role} producer"), &error))
}

/// A consumer that never subscribes: it reads metadata, watermarks and a group's offsets
/// without joining the group.
pub fn observer(target: &KafkaTarget, group: &str) -> Result<BaseConsumer> {
    let mut config = base_config(target, "mqdrain-observer");
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false");
    config
        .create()
        .map_err(|error| client_setup_error(target, "Kafka client", &error))
}

pub fn admin(target: &KafkaTarget) -> Result<AdminClient<DefaultClientContext>> {
    base_config(target, "mqdrain-admin")
        .create()
        .map_err(|error| client_setup_error(target, "Kafka client", &error))
}

pub fn admin_options() -> AdminOptions {
    AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT))
}

/// librdkafka refused the settings before any request: names the setting, never a secret value.
pub fn client_setup_error(target: &KafkaTarget, client: &str, error: &KafkaError) -> Error {
    let reason = match error {
        // Its Display appends the refused value, which may be a password.
        KafkaError::ClientConfig(_, description, key, _) => {
            format!("librdkafka refused -X {key}: {description}")
        }
        other => other.to_string(),
    };
    Error::usage(format!(
        "cannot set up the {client} for {}: {}; check the -X settings",
        target.bootstrap_servers,
        target.hide_secrets(&reason)
    ))
}

/// Maps a librdkafka error on a request to the broker.
pub fn request_error(target: &KafkaTarget, what: &str, error: &KafkaError) -> Error {
    match error.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::Resolve
            | RDKafkaErrorCode::BrokerNotAvailable,
        ) => Error::Unreachable {
            service: SERVICE,
            endpoint: format!("kafka://{}", target.bootstrap_servers),
            detail: target.hide_secrets(&format!("{what}: {error}")),
        },
        Some(
            RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ) => Error::AccessRefused {
            service: SERVICE,
            endpoint: format!("kafka://{}", target.bootstrap_servers),
            user: target
                .client_config
                .iter()
                .find(|(key, _)| key == "sasl.username")
                .map_or_else(|| "(none)".to_string(), |(_, user)| user.clone()),
        },
        _ => Error::Broker(format!(
            "Kafka at {}: {what}: {}",
            target.bootstrap_servers,
            target.hide_secrets(&error.to_string())
        )),
    }
}

/// Runs a blocking librdkafka call off the async runtime's threads.
pub async fn blocking<T, F>(call: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|error| Error::Broker(format!("a Kafka client call failed to run: {error}")))?
}
