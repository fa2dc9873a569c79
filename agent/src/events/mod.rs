//! Typed events and the fan-out pipeline to subscribers.
pub mod model;
pub mod bus;
