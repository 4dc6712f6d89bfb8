//! The deterministic simulation of one hub core and N sidecar cores (see `world`).

mod rng;
mod store;
mod world;

pub(crate) use world::{Config, FAULT_KINDS, Summary, run};
