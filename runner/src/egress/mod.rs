//! The egress proxy of a step with an allow-list, and the network policy.

pub mod netpolicy;
pub mod proxy;
