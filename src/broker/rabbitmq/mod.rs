//! RabbitMQ behind the broker boundary: AMQP through lapin, statistics through the management API.

pub mod amqp;
pub mod dlq;
pub mod drain;
pub mod forwarding;
pub mod inspect;
pub mod load;
pub mod management;
pub mod settings;
