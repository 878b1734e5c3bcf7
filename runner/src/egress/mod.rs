//! The egress proxy of a step with an allow-list, and the network policy.
//!
//! `proxy` serves a step: `http` forwards plain HTTP, `tunnel` runs CONNECT tunnels
//! once `tls` has read their ClientHello; all three rest on `state` (the limits, the
//! allow-list decision, the record), `metered` (the byte budget and the idle
//! timeout) and `record` (what the link reports); `splice` relays an opened tunnel's
//! bytes between the sockets without copying them through the proxy. `netpolicy` parses and matches
//! allow-lists and ceilings; `special` classifies the addresses a name may not
//! resolve to. `process` runs the proxy of one step in a process of its own, without
//! privileges: the step's bytes are never parsed in the daemon.

mod http;
mod metered;
pub mod netpolicy;
pub mod process;
pub mod proxy;
pub mod record;
pub mod special;
mod splice;
pub mod state;
#[cfg(test)]
mod testing;
mod tls;
mod tunnel;
