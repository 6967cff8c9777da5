//! Kubernetes plumbing shared by ebb's connectors and autoscaler:
//!
//! - [`discover`] / [`Discovery`]: watches Deployments and StatefulSets and
//!   publishes the [`ebb_model::Catalog`] of functions they declare, plus the
//!   [`Workload`] behind each function;
//! - [`Recorder`]: `core/v1` Events about objects (`kubectl describe`);
//! - [`client`]: a client from the kubeconfig or the in-cluster service
//!   account, after [`install_crypto_provider`].
//!
//! ```no_run
//! # async fn run() -> Result<(), ebb_kube::Error> {
//! use std::sync::Arc;
//! let client = ebb_kube::client().await?;
//! let recorder = ebb_kube::Recorder::new(client.clone(), "ebb-connector-nats");
//! let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(ebb_model::Catalog::default()));
//! tokio::spawn(ebb_kube::discover(client, None, tx, Some(recorder)));
//! let first = ebb_kube::first_catalog(&mut rx).await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

mod discovery;
mod error;
pub mod lease;
pub mod manifests;
mod recorder;

#[cfg(test)]
mod api_tests;

pub use discovery::{
    Discovery, INVALID_CONFIG_REASON, Workload, WorkloadKind, Workloads, discover, first_catalog,
};
pub use error::Error;
pub use lease::{Elector, LeaderHandle, LeaderState, LeaseConfig};
pub use recorder::{AGGREGATION_WINDOW, EventType, Recorder};

/// The `kube` and `k8s-openapi` versions ebb is built with.
pub use {k8s_openapi, kube};

/// Makes aws-lc-rs the process-wide rustls crypto provider.
///
/// Needed before the first TLS connection whenever both rustls backends are
/// linked into the binary (ebb links `ring` through some broker clients):
/// rustls then cannot pick one by itself and kube's TLS set-up panics.
/// Idempotent, and harmless when a provider is already installed.
pub fn install_crypto_provider() {
    // `Err` only means a provider is installed already.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A client from `KUBECONFIG` / `~/.kube/config`, else the in-cluster
/// service account (as `kubectl` does). Installs the crypto provider first.
pub async fn client() -> Result<kube::Client, Error> {
    install_crypto_provider();
    kube::Client::try_default().await.map_err(Error::Config)
}

#[cfg(test)]
mod tests {
    #[test]
    fn crypto_provider_install_is_idempotent() {
        super::install_crypto_provider();
        super::install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
