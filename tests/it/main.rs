//! ebb's integration tests: one test binary (`it`), one module per area.
//!
//! Everything here runs real `ebb` processes (or the crates' public APIs)
//! against real brokers from [`support`] and the Kubernetes API double
//! (`ebb_kube_double`, in `testing/kube-double`). One binary means the
//! shared support code is compiled and linked once.
//!
//! ```sh
//! cargo nextest run --test it                            # all of them
//! cargo nextest run --test it -E 'test(nats_connector::)'  # one module
//! cargo test --release --test it bench_wake:: -- --ignored --nocapture  # a benchmark
//! ```
//!
//! Benchmarks (`bench_*` modules) are `#[ignore]`d: they run only when asked
//! for, as above (docs/BENCHMARKS.md).

mod autoscaler_stub;
mod support;

mod amqp_connector;
mod autoscaler;
mod autoscaler_brokers;
mod autoscaler_cold_start;
mod autoscaler_guard;
mod autoscaler_inflight;
mod autoscaler_kafka;
mod autoscaler_lease;
mod autoscaler_prewarm;
mod autoscaler_prometheus;
mod autoscaler_rabbitmq;
mod autoscaler_target;
mod bench_amqp;
mod bench_autoscaler;
mod bench_dev;
mod bench_kafka;
mod bench_wake;
mod brokers;
mod connector_reload;
mod cron_connector;
mod cron_failover;
mod deploy;
mod dev;
mod kafka_connector;
mod kube_discovery;
mod kube_lease;
mod memory;
mod nats_connector;
mod nats_core;
mod nats_kubernetes;
mod retention;
mod soak;
mod worker;

/// A new integration test is a module here: a file directly under `tests/`
/// would be a test binary of its own, compiling and linking all of
/// `support` again.
#[test]
fn integration_tests_are_modules_of_one_binary() {
    let dir = support::workspace_root().join("tests");
    let mut others: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("read {}: {err}", dir.display()))
        .map(|entry| entry.expect("directory entry").file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| name != "it")
        .collect();
    others.sort();
    assert!(
        others.is_empty(),
        "move {others:?} into tests/it/ as modules of tests/it/main.rs"
    );
}
