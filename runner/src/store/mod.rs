//! Durable state: the content store and the job database.

pub mod cas;
pub mod db;
