//! The broker boundary: everything broker-specific lives below here.

pub mod kafka;
pub mod rabbitmq;
