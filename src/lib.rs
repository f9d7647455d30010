//! mqdrain: drain a backlogged RabbitMQ queue or Kafka topic without losing a message.
//!
//! The core (`ops`, `broker`) never prints; it emits `progress` events and returns results that
//! the `ui` layer renders. `cli` holds the clap types only.

pub mod broker;
pub mod cli;
pub mod endpoint;
pub mod error;
pub mod ops;
pub mod playbook;
pub mod progress;
pub mod ui;
