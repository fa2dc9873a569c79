//! Typed events and the fan-out pipeline to subscribers.
pub mod bus;
pub mod model;
