//! RabbitMQ as a forwarding source (manual-ack consumer) and sink (publisher confirms).

use super::amqp::{channel_error, connection_error};
use crate::broker::{Confirmation, KeySource, Position, Refusal, Sink, Source, ID_HEADER};
use crate::endpoint::RabbitTarget;
use crate::error::{Error, Result};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use std::collections::BTreeSet;
use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Headers recording where a forwarded message was first published.
/// Consumer-tag prefix of a forwarder: seen in the queue's consumer list at once, while the
/// connection's client name can lag behind in the management statistics.
pub const FORWARD_CONSUMER_TAG: &str = "mqdrain-forward";

pub const ORIGINAL_EXCHANGE_HEADER: &str = "x-mqdrain-original-exchange";
pub const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-mqdrain-original-routing-key";

pub struct QueueSource {
    channel: Channel,
    consumer: Consumer,
    consumer_tag: String,
    queue: String,
    target: RabbitTarget,
    /// Deliveries the loop skipped: held unacknowledged until `close` requeues them. Requeueing
    /// at once would hand them straight back to this consumer, again and again.
    held: BTreeSet<u64>,
    /// Every delivery tag up to this one is acknowledged (tags on the channel are consecutive).
    acked_up_to: u64,
}

impl QueueSource {
    pub async fn open(
        connection: &Connection,
        target: &RabbitTarget,
        queue: &str,
        prefetch: u16,
    ) -> Result<Self> {
        Self::open_tagged(connection, target, queue, prefetch, FORWARD_CONSUMER_TAG).await
    }

    /// Like `open`, with the consumer tag's prefix naming the operation (`mqdrain-dlq-replay`).
    pub async fn open_tagged(
        connection: &Connection,
        target: &RabbitTarget,
        queue: &str,
        prefetch: u16,
        tag_prefix: &str,
    ) -> Result<Self> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|error| connection_error(target, &error))?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|error| connection_error(target, &error))?;
        let consumer_tag = format!("{tag_prefix}-{}", std::process::id());
        let consumer = channel
            .basic_consume(
                queue.into(),
                consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|error| channel_error(target, queue, &error))?;
        Ok(QueueSource {
            channel,
            consumer,
            consumer_tag,
            queue: queue.to_string(),
            target: target.clone(),
            held: BTreeSet::new(),
            acked_up_to: 0,
        })
    }

    /// Queues the ack without waiting for its write: an ack the broker never gets only means a
    /// redelivery, and the channel's close (after every queued frame) is awaited.
    fn ack(&self, tag: u64, multiple: bool) -> Result<()> {
        let mut acking = pin!(self.channel.basic_ack(tag, BasicAckOptions { multiple }));
        match queue_frames(acking.as_mut()) {
            Poll::Ready(Err(error)) => Err(channel_error(&self.target, &self.queue, &error)),
            _ => Ok(()),
        }
    }
}

impl Source for QueueSource {
    type Message = Delivery;

    async fn receive(&mut self, wait: Duration) -> Result<Option<Delivery>> {
        match tokio::time::timeout(wait, self.consumer.next()).await {
            Err(_) => Ok(None),
            Ok(Some(Ok(delivery))) => Ok(Some(delivery)),
            Ok(Some(Err(error))) => Err(channel_error(&self.target, &self.queue, &error)),
            Ok(None) => Err(Error::Broker(format!(
                "the broker cancelled mqdrain's consumer on queue '{}' (was it deleted?); unacknowledged messages went back to it",
                self.queue
            ))),
        }
    }

    fn position(message: &Delivery) -> Position {
        Position {
            lane: 0,
            seq: message.delivery_tag,
        }
    }

    fn key<'m>(message: &'m Delivery, key: &KeySource) -> Option<&'m [u8]> {
        match key {
            KeySource::RoutingKey => Some(message.routing_key.as_str().as_bytes()),
            KeySource::MessageId => message
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().as_bytes()),
            KeySource::Header(name) => message
                .properties
                .headers()
                .as_ref()
                .and_then(|headers| headers.inner().get(name.as_str()))
                .and_then(|value| match value {
                    AMQPValue::LongString(text) => Some(text.as_bytes()),
                    AMQPValue::ShortString(text) => Some(text.as_str().as_bytes()),
                    _ => None,
                }),
        }
    }

    fn identity(message: &Delivery, header: Option<&str>) -> Option<Vec<u8>> {
        let id = match header {
            None => message
                .properties
                .message_id()
                .as_ref()?
                .as_str()
                .as_bytes()
                .to_vec(),
            Some(name) => {
                match message.properties.headers().as_ref()?.inner().get(name)? {
                    AMQPValue::LongString(text) => text.as_bytes().to_vec(),
                    AMQPValue::ShortString(text) => text.as_str().as_bytes().to_vec(),
                    // Producers often number their messages: integers are ids too.
                    AMQPValue::ShortShortInt(n) => n.to_string().into_bytes(),
                    AMQPValue::ShortShortUInt(n) => n.to_string().into_bytes(),
                    AMQPValue::ShortInt(n) => n.to_string().into_bytes(),
                    AMQPValue::ShortUInt(n) => n.to_string().into_bytes(),
                    AMQPValue::LongInt(n) => n.to_string().into_bytes(),
                    AMQPValue::LongUInt(n) => n.to_string().into_bytes(),
                    AMQPValue::LongLongInt(n) => n.to_string().into_bytes(),
                    _ => return None,
                }
            }
        };
        (!id.is_empty()).then_some(id)
    }

    async fn acknowledge(&mut self, position: Position) -> Result<()> {
        for (tag, multiple) in ack_plan(self.acked_up_to, position.seq, &self.held) {
            self.ack(tag, multiple)?;
        }
        self.acked_up_to = self.acked_up_to.max(position.seq);
        Ok(())
    }

    async fn skip(&mut self, message: &Delivery) -> Result<()> {
        self.held.insert(message.delivery_tag);
        Ok(())
    }

    async fn close(self) -> Result<()> {
        // Closing the channel returns every unacknowledged delivery to the queue, held
        // (skipped) ones included; a classic queue puts them back in their old places.
        let _ = self
            .channel
            .basic_cancel(
                self.consumer_tag.as_str().into(),
                BasicCancelOptions::default(),
            )
            .await;
        self.channel
            .close(200, "mqdrain forward done".into())
            .await
            .or_else(|error| match error.kind() {
                lapin::ErrorKind::InvalidChannelState(..) => Ok(()),
                _ => Err(connection_error(&self.target, &error)),
            })
    }
}

/// The `basic.ack`s (tag, multiple) that remove every delivery after `acked_up_to` up to and
/// including `upto` except the held ones. `multiple` would also remove a held delivery below the
/// tag, so past the lowest held delivery each tag is acknowledged on its own.
fn ack_plan(acked_up_to: u64, upto: u64, held: &BTreeSet<u64>) -> Vec<(u64, bool)> {
    if upto <= acked_up_to {
        return Vec::new();
    }
    let from = acked_up_to + 1;
    match held.first().copied().filter(|&lowest| lowest <= upto) {
        None => vec![(upto, true)],
        Some(lowest) => {
            let mut plan = Vec::new();
            if lowest > from {
                plan.push((lowest - 1, true));
            }
            plan.extend(
                (from.max(lowest + 1)..=upto)
                    .filter(|tag| !held.contains(tag))
                    .map(|tag| (tag, false)),
            );
            plan
        }
    }
}

pub struct QueueSink {
    channel: Channel,
    queues: Vec<String>,
    target: RabbitTarget,
}

impl QueueSink {
    pub async fn open(
        connection: &Connection,
        target: &RabbitTarget,
        queues: Vec<String>,
    ) -> Result<Self> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|error| connection_error(target, &error))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|error| connection_error(target, &error))?;
        Ok(QueueSink {
            channel,
            queues,
            target: target.clone(),
        })
    }
}

impl Sink for QueueSink {
    type Message = Delivery;

    fn fanout(&self) -> usize {
        self.queues.len()
    }

    fn target_name(&self, _lane: u32, index: usize) -> String {
        format!("queue '{}'", self.queues[index])
    }

    async fn send(&mut self, _lane: u32, index: usize, message: &Delivery) -> Result<Confirmation> {
        self.publish(index, message, None)
    }

    async fn send_identified(
        &mut self,
        _lane: u32,
        index: usize,
        message: &Delivery,
        id: &[u8],
    ) -> Result<Confirmation> {
        self.publish(index, message, Some(id))
    }

    async fn close(self) -> Result<()> {
        let _ = self.channel.close(200, "mqdrain forward done".into()).await;
        Ok(())
    }
}

impl QueueSink {
    fn publish(&self, index: usize, message: &Delivery, id: Option<&[u8]>) -> Result<Confirmation> {
        // Through a named exchange the routing key carries what consumers may route on, which
        // the temporary queue's name would hide: it is recorded, once (a message forwarded twice
        // keeps where it was first published). Through the default exchange it is the source
        // queue's name and nothing is added: no headers table for the broker to decode and
        // store per message (the benchmark's broker CPU per message fell by roughly a tenth).
        let record_origin = !message.exchange.as_str().is_empty()
            && !message
                .properties
                .headers()
                .as_ref()
                .is_some_and(|headers| headers.inner().contains_key(ORIGINAL_EXCHANGE_HEADER));
        let properties = if record_origin || id.is_some() {
            let mut headers = message.properties.headers().clone().unwrap_or_default();
            if record_origin {
                headers.insert(
                    ShortString::from(ORIGINAL_EXCHANGE_HEADER),
                    AMQPValue::LongString(message.exchange.as_str().into()),
                );
                headers.insert(
                    ShortString::from(ORIGINAL_ROUTING_KEY_HEADER),
                    AMQPValue::LongString(message.routing_key.as_str().into()),
                );
            }
            if let Some(id) = id {
                headers.insert(
                    ShortString::from(ID_HEADER),
                    AMQPValue::LongString(id.to_vec().into()),
                );
            }
            message.properties.clone().with_headers(headers)
        } else {
            message.properties.clone()
        };
        publish_confirmed(
            &self.channel,
            &self.target,
            &self.queues[index],
            &message.data,
            properties,
        )
    }
}

/// Publishes `payload` to `queue` through the default exchange with `mandatory`; the returned
/// confirmation resolves once the broker confirmed (or refused) it.
pub fn publish_confirmed(
    channel: &Channel,
    target: &RabbitTarget,
    queue: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<Confirmation> {
    let channel = channel.clone();
    let routing_key = ShortString::from(queue);
    let payload = payload.to_vec();
    let mut publishing = Box::pin(async move {
        channel
            .basic_publish(
                "".into(),
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &payload,
                properties,
            )
            .await
    });
    // Waiting for the socket write here would hand every message to lapin's I/O thread on its
    // own — one write and several thread wake-ups per message; left to the confirmation, the
    // publishes queued meanwhile leave in one write.
    match queue_frames(publishing.as_mut()) {
        Poll::Ready(Ok(confirm)) => Ok(confirmation(confirm)),
        Poll::Ready(Err(error)) => Err(channel_error(target, queue, &error)),
        Poll::Pending => Ok(Box::pin(async move {
            match publishing.await {
                Ok(confirm) => confirmation(confirm).await,
                Err(error) => Err(Refusal::fatal(format!(
                    "the publishing channel failed: {error}"
                ))),
            }
        })),
    }
}

/// Polls a lapin method future once. lapin takes the delivery tag and queues the method's frames
/// on the first poll, in call order; what is left is waiting for the socket write, which nobody
/// needs to be woken for (hence the no-op waker).
fn queue_frames<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(Waker::noop()))
}

/// What the loop awaits for one publish: the broker's confirm, a return or nack as a refusal.
pub fn confirmation(confirm: lapin::PublisherConfirm) -> Confirmation {
    Box::pin(async move {
        match confirm.await {
            Ok(lapin::Confirmation::Ack(None)) => Ok(()),
            Ok(
                lapin::Confirmation::Ack(Some(returned)) | lapin::Confirmation::Nack(Some(returned)),
            ) => Err(Refusal::unattributable(format!(
                "the broker returned a message for queue '{}' as unroutable ({} {}): the queue does not exist any more",
                returned.routing_key, returned.reply_code, returned.reply_text
            ))),
            Ok(lapin::Confirmation::Nack(None)) => Err(Refusal::retry(
                "the broker nacked it (queue full with reject-publish, or an internal error)",
            )),
            Ok(lapin::Confirmation::NotRequested) => {
                Err(Refusal::fatal("publisher confirms were not enabled"))
            }
            Err(error) => Err(Refusal::fatal(format!(
                "the publishing channel failed: {error}"
            ))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(tags: &[u64]) -> BTreeSet<u64> {
        tags.iter().copied().collect()
    }

    #[test]
    fn without_held_deliveries_one_multiple_ack_covers_the_range() {
        assert_eq!(ack_plan(0, 100, &held(&[])), vec![(100, true)]);
        assert_eq!(ack_plan(100, 100, &held(&[])), vec![]);
        assert_eq!(ack_plan(0, 5, &held(&[9])), vec![(5, true)], "held above");
    }

    #[test]
    fn held_deliveries_are_never_covered_by_an_ack() {
        assert_eq!(
            ack_plan(0, 6, &held(&[3, 5])),
            vec![(2, true), (4, false), (6, false)]
        );
        // A held delivery below the range still forbids `multiple`.
        assert_eq!(
            ack_plan(6, 9, &held(&[3, 5])),
            vec![(7, false), (8, false), (9, false)]
        );
        assert_eq!(ack_plan(0, 1, &held(&[1])), vec![]);
        assert_eq!(ack_plan(1, 3, &held(&[2])), vec![(3, false)]);
    }
}
