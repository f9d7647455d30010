//! Kafka behind the broker boundary: rdkafka clients, topic/group inspection.

pub mod client;
pub mod dlq;
pub mod drain;
pub mod forwarding;
pub mod inspect;
pub mod load;
pub mod offsets;
