//! Durable state: the content store, the job database and the audit log.

pub mod audit;
pub mod cas;
pub mod db;
