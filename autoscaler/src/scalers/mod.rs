pub mod nats;
pub mod prometheus;
