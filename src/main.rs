//! The `ebb` binary: parses the command line and hands over to the crates.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // Two rustls crypto backends are linked (broker clients bring ring);
    // without a default, kube's TLS set-up would panic.
    ebb_kube::install_crypto_provider();
    cli.init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ebb: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Returning (rather than exiting) drops the runtime, so every task's
    // clean-up runs: children are killed with their process groups.
    runtime.block_on(cli.run())
}
