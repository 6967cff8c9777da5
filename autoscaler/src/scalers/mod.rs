pub mod inflight;
pub mod kafka;
pub mod nats;
pub mod prometheus;
pub mod rabbitmq;
