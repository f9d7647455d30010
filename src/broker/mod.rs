//! The broker boundary: the source and sink traits the forwarding loop is written against, and
//! everything broker-specific below `rabbitmq` and `kafka`.

pub mod kafka;
pub mod rabbitmq;

use crate::error::{Error, Result};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// Header into which `forward --dedup` stamps a message's stable id, so that consumers downstream
/// can drop duplicates the same way.
pub const ID_HEADER: &str = "x-mqdrain-id";

/// Where a message sits in its source: a lane (Kafka partition; RabbitMQ has one lane) and an
/// increasing position inside it (Kafka offset; AMQP delivery tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub lane: u32,
    pub seq: u64,
}

/// Which part of a message the key-hash strategy hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// AMQP routing key, or the Kafka record key.
    RoutingKey,
    /// AMQP `message-id` property.
    MessageId,
    /// A header value (AMQP header or Kafka record header).
    Header(String),
}

/// A consumed backlog. Messages are acknowledged only after the sink confirmed them.
pub trait Source: Send {
    type Message: Send + Sync + 'static;

    /// The next message, or `None` when none arrived within `wait`.
    fn receive(
        &mut self,
        wait: Duration,
    ) -> impl Future<Output = Result<Option<Self::Message>>> + Send;

    fn position(message: &Self::Message) -> Position;

    /// The bytes key-hash routes on, if the message has that key.
    fn key<'m>(message: &'m Self::Message, key: &KeySource) -> Option<&'m [u8]>;

    /// The message's stable identity for duplicate suppression: the value of `header` when
    /// given, else the broker's own (RabbitMQ: the message-id property; Kafka:
    /// `<topic>-<partition>-<offset>`). `None` (also for an empty value): the message has none
    /// and passes unchecked. The default knows no identity.
    fn identity(message: &Self::Message, header: Option<&str>) -> Option<Vec<u8>> {
        let _ = (message, header);
        None
    }

    /// Every message of `position.lane` up to and including `position.seq` is confirmed by the
    /// sink and may be removed from the source for good.
    fn acknowledge(&mut self, position: Position) -> impl Future<Output = Result<()>> + Send;

    /// The loop will not forward `message` (the sink's `route` said `Route::Skip`). The source
    /// must leave it on the broker: a later `acknowledge` of a higher position must not remove
    /// it. Sources that cannot leave one message behind keep this default, which refuses, so a
    /// skipping sink cannot silently lose messages on them.
    fn skip(&mut self, _message: &Self::Message) -> impl Future<Output = Result<()>> + Send {
        async {
            Err(Error::Broker(
                "this source cannot leave a message behind while acknowledging later ones; it must not be paired with a sink that skips messages".to_string(),
            ))
        }
    }

    /// Stops consuming and makes acknowledgements durable; everything received but not
    /// acknowledged returns to the broker for redelivery.
    fn close(self) -> impl Future<Output = Result<()>> + Send;
}

/// Why the target broker did not take a message.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub reason: String,
    pub kind: RefusalKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// Worth publishing again after a backoff (a nack).
    Retry,
    /// Retrying cannot help (the connection is gone).
    Fatal,
    /// The client could not tell which publish this verdict belongs to: lapin hands a
    /// `basic.return` to the first confirmation resolved after it, which under coalesced
    /// (`multiple`) confirms may be another message's. No acknowledgement is safe any more.
    Unattributable,
}

impl Refusal {
    pub fn retry(reason: impl Into<String>) -> Self {
        Refusal {
            reason: reason.into(),
            kind: RefusalKind::Retry,
        }
    }

    pub fn fatal(reason: impl Into<String>) -> Self {
        Refusal {
            reason: reason.into(),
            kind: RefusalKind::Fatal,
        }
    }

    pub fn unattributable(reason: impl Into<String>) -> Self {
        Refusal {
            reason: reason.into(),
            kind: RefusalKind::Unattributable,
        }
    }
}

/// Resolves when the target broker confirmed the message, or refused it.
pub type Confirmation = Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send>>;

/// Where one message goes, decided by the sink before the loop's strategy is consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The loop's strategy (round-robin, key-hash) picks the target: every drain sink.
    Strategy,
    /// Target `index` of the message's lane, whatever the strategy says.
    Target(usize),
    /// Not forwarded and never acknowledged: the source keeps it (`Source::skip`).
    Skip,
}

/// The temporary capacity messages are forwarded into.
pub trait Sink: Send {
    type Message: Send + Sync + 'static;

    /// Targets available to each source lane (temporary queues, or partitions per block).
    fn fanout(&self) -> usize;

    /// A per-message decision for sinks whose targets mean different things (dead-letter
    /// replay: the destination or the parking lot, or leave it in the DLQ). The default leaves
    /// every message to the strategy, which is what the drain's sinks want.
    fn route(&self, _lane: u32, _message: &Self::Message) -> Route {
        Route::Strategy
    }

    /// Display name of target `index` of `lane`.
    fn target_name(&self, lane: u32, index: usize) -> String;

    /// Publishes `message` to target `index` of `lane`; the message keeps every property.
    fn send(
        &mut self,
        lane: u32,
        index: usize,
        message: &Self::Message,
    ) -> impl Future<Output = Result<Confirmation>> + Send;

    /// `send`, with `id` (see `Source::identity`) stamped into the `ID_HEADER` header. The
    /// default publishes without it, for sinks whose messages carry no headers.
    fn send_identified(
        &mut self,
        lane: u32,
        index: usize,
        message: &Self::Message,
        id: &[u8],
    ) -> impl Future<Output = Result<Confirmation>> + Send {
        let _ = id;
        self.send(lane, index, message)
    }

    /// Finishes outstanding work (flushes producers) before the process ends.
    fn close(self) -> impl Future<Output = Result<()>> + Send;
}
