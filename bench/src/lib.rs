#![forbid(unsafe_code)]
//! Benchmark helpers for ebb: the `ebb-load` HTTP/1.1 load generator, the
//! `ebb-bench-upstream` trivial HTTP server, and the statistics they share.

pub mod cli;
pub mod load;
pub mod stats;
pub mod upstream;
