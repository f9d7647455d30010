//! AMQP 0-9-1 connections to RabbitMQ through lapin, and the mapping of its errors to ours.

use crate::endpoint::RabbitTarget;
use crate::error::{Error, Result};
use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind};

const SERVICE: &str = "RabbitMQ (AMQP)";

/// Prefix of every connection name this tool opens, so that consumer listings can tell ours apart.
pub const CONNECTION_NAME_PREFIX: &str = "mqdrain ";

/// AMQP carries queue names, routing keys and the vhost as short strings of at most this many
/// bytes; amq-protocol panics on a longer one (or sends a malformed frame), so every command
/// checks the names it is given first.
pub const MAX_SHORT_STRING: usize = 255;

/// A usage error unless `name` can be a RabbitMQ queue name; `what` says which one it is.
pub fn check_queue_name(name: &str, what: &str) -> Result<()> {
    if !name.is_empty() && name.len() <= MAX_SHORT_STRING {
        return Ok(());
    }
    let mut shown: String = name.chars().take(40).collect();
    if shown.len() < name.len() {
        shown.push_str("...");
    }
    Err(Error::usage(format!(
        "{what} '{shown}' is not a RabbitMQ queue name: it is {} bytes long, and queue names are 1 to {MAX_SHORT_STRING} bytes",
        name.len()
    )))
}

/// What a passive declare tells without the management API.
#[derive(Debug, Clone, Copy)]
pub struct PassiveCounts {
    /// Ready messages only: messages a consumer holds unacked are not counted by queue.declare.
    pub ready: u64,
    pub consumers: u64,
}

pub async fn connect(target: &RabbitTarget, purpose: &str) -> Result<Connection> {
    connect_named(target, &format!("{CONNECTION_NAME_PREFIX}{purpose}")).await
}

/// Connects with exactly `name` as the connection name: `mqdrain load` poses as an application,
/// so its connections must not carry mqdrain's prefix.
pub async fn connect_named(target: &RabbitTarget, name: &str) -> Result<Connection> {
    let uri = AMQPUri {
        scheme: if target.tls {
            AMQPScheme::AMQPS
        } else {
            AMQPScheme::AMQP
        },
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: target.username.clone(),
                password: target.password.clone(),
            },
            host: target.host.clone(),
            port: target.port,
        },
        vhost: target.vhost.clone(),
        query: AMQPQueryString {
            heartbeat: target.heartbeat,
            connection_timeout: Some(10_000),
            ..AMQPQueryString::default()
        },
    };
    let properties = ConnectionProperties::default().with_connection_name(name.to_string().into());
    let tls =
        lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: match &target.ca_file {
                Some(path) => Some(std::fs::read_to_string(path).map_err(|error| {
                    Error::usage(format!("cannot read CA file '{path}': {error}"))
                })?),
                None => None,
            },
        };
    let runtime = lapin::runtime::default_runtime()
        .map_err(|error| Error::Broker(format!("cannot start the AMQP runtime: {error}")))?;
    Connection::connect_uri_with_config(uri, properties, tls, runtime)
        .await
        .map_err(|error| match error.kind() {
            // During the handshake ACCESS_REFUSED means the login itself failed.
            ErrorKind::ProtocolError(amqp)
                if matches!(
                    amqp.kind(),
                    AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                ) =>
            {
                access_refused(target)
            }
            // During the handshake NOT_ALLOWED answers connection.open: no such vhost, or the
            // user has no permissions on it (RabbitMQ does not say which).
            ErrorKind::ProtocolError(amqp)
                if matches!(amqp.kind(), AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)) =>
            {
                Error::NotFound {
                    kind: "vhost",
                    name: target.vhost.clone(),
                    scope: format!(
                        " (or user '{}' may not use it) on {}",
                        target.username,
                        target.amqp_redacted()
                    ),
                    hint: "check the vhost in --url (amqp://host:5672/VHOST, percent-encoded: %2f is '/'); `rabbitmqctl list_vhosts` lists them, `rabbitmqctl set_permissions -p VHOST USER '.*' '.*' '.*'` grants access".to_string(),
                }
            }
            _ => connection_error(target, &error),
        })
}

/// Ready count and consumer count of a queue; `NotFound` when it does not exist.
pub async fn passive_declare(
    connection: &Connection,
    target: &RabbitTarget,
    queue: &str,
) -> Result<PassiveCounts> {
    // A failed passive declare closes its channel, so each probe gets a fresh one.
    let channel = open_channel(connection, target).await?;
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
        .map_err(|error| channel_error(target, queue, &error))?;
    let _ = channel.close(200, "done".into()).await;
    Ok(PassiveCounts {
        ready: u64::from(declared.message_count()),
        consumers: u64::from(declared.consumer_count()),
    })
}

pub async fn open_channel(connection: &Connection, target: &RabbitTarget) -> Result<Channel> {
    connection
        .create_channel()
        .await
        .map_err(|error| connection_error(target, &error))
}

pub fn queue_not_found(target: &RabbitTarget, queue: &str) -> Error {
    Error::NotFound {
        kind: "queue",
        name: queue.to_string(),
        scope: format!(" in vhost '{}'", target.vhost),
        hint: "check the name and the vhost in --url (amqp://host/VHOST); `rabbitmqctl list_queues -p VHOST` lists them".to_string(),
    }
}

/// Maps an error on a queue operation, naming the queue when the broker says it is missing.
pub fn channel_error(target: &RabbitTarget, queue: &str, error: &lapin::Error) -> Error {
    if let ErrorKind::ProtocolError(amqp) = error.kind() {
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)) {
            return queue_not_found(target, queue);
        }
    }
    connection_error(target, error)
}

pub fn connection_error(target: &RabbitTarget, error: &lapin::Error) -> Error {
    let endpoint = target.amqp_redacted();
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => Error::Broker(format!(
                "{SERVICE} at {endpoint}: user '{}' may not use vhost '{}' ({}); check the vhost in the URL and the user's permissions",
                target.username,
                target.vhost,
                amqp.get_message()
            )),
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Error::Broker(format!(
                "{SERVICE} at {endpoint} refused the operation: {}; check the user's permissions",
                amqp.get_message()
            )),
            _ => Error::Broker(format!("{SERVICE} at {endpoint}: {}", amqp.get_message())),
        },
        ErrorKind::IOError(io) => Error::Unreachable {
            service: SERVICE,
            endpoint,
            detail: io.to_string(),
        },
        ErrorKind::AuthProviderError(_) => access_refused(target),
        ErrorKind::InvalidConnectionState(_) => {
            // RabbitMQ drops the socket during the handshake when the credentials are wrong.
            access_refused(target)
        }
        other => Error::Broker(format!("{SERVICE} at {endpoint}: {other:?}")),
    }
}

fn access_refused(target: &RabbitTarget) -> Error {
    Error::AccessRefused {
        service: SERVICE,
        endpoint: target.amqp_redacted(),
        user: target.username.clone(),
    }
}
