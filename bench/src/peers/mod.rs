//! One module per system under test: how to start its server and how to drive it.

pub mod nats;
pub mod rabbitmq;
pub mod redis;
pub mod sluice;
