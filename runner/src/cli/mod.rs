//! The `kiln` command line's client side: its arguments, the daemon client, job files,
//! `kiln verify`, `kiln demo`, `kiln jobs` and `kiln whoami`, `kiln audit`.

pub mod args;
pub mod audit;
pub mod client;
pub mod connect;
pub mod demo;
pub mod image;
pub mod jobfile;
pub mod listing;
pub mod verify;
