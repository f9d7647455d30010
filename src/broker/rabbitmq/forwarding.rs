//! RabbitMQ as a forwarding source (manual-ack consumer) and sink (publisher confirms).

use super::amqp::{channel_error, connection_error};
use crate::broker::{Confirmation, KeySource, Position, Refusal, Sink, Source};
use crate::endpoint::RabbitTarget;
use crate::error::{Error, Result};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer};
use std::time::Duration;

/// Headers recording where a forwarded message was first published.
pub const ORIGINAL_EXCHANGE_HEADER: &str = "x-mqdrain-original-exchange";
pub const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-mqdrain-original-routing-key";

pub struct QueueSource {
    channel: Channel,
    consumer: Consumer,
    consumer_tag: String,
    queue: String,
    target: RabbitTarget,
}

impl QueueSource {
    pub async fn open(
        connection: &Connection,
        target: &RabbitTarget,
        queue: &str,
        prefetch: u16,
    ) -> Result<Self> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|error| connection_error(target, &error))?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|error| connection_error(target, &error))?;
        let consumer_tag = format!("mqdrain-forward-{}", std::process::id());
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
        })
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

    async fn acknowledge(&mut self, position: Position) -> Result<()> {
        self.channel
            .basic_ack(position.seq, BasicAckOptions { multiple: true })
            .await
            .map_err(|error| channel_error(&self.target, &self.queue, &error))
    }

    async fn close(self) -> Result<()> {
        // Closing the channel returns every unacknowledged delivery to the queue.
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
        let mut headers = message.properties.headers().clone().unwrap_or_default();
        // A message forwarded twice keeps the record of where it was first published.
        let inner = headers.inner();
        let record_origin = !inner.contains_key(ORIGINAL_EXCHANGE_HEADER);
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
        let properties = message.properties.clone().with_headers(headers);
        let queue = &self.queues[index];
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &message.data,
                properties,
            )
            .await
            .map_err(|error| channel_error(&self.target, queue, &error))?;
        Ok(Box::pin(async move {
            match confirm.await {
                Ok(lapin::Confirmation::Ack(None)) => Ok(()),
                Ok(lapin::Confirmation::Ack(Some(returned)) | lapin::Confirmation::Nack(Some(returned))) => {
                    Err(Refusal::unattributable(format!(
                        "the broker returned a message for queue '{}' as unroutable ({} {}): the queue does not exist any more",
                        returned.routing_key, returned.reply_code, returned.reply_text
                    )))
                }
                Ok(lapin::Confirmation::Nack(None)) => Err(Refusal::retry(
                    "the broker nacked it (queue full with reject-publish, or an internal error)",
                )),
                Ok(lapin::Confirmation::NotRequested) => {
                    Err(Refusal::fatal("publisher confirms were not enabled"))
                }
                Err(error) => Err(Refusal::fatal(format!("the publishing channel failed: {error}"))),
            }
        }))
    }

    async fn close(self) -> Result<()> {
        let _ = self.channel.close(200, "mqdrain forward done".into()).await;
        Ok(())
    }
}
