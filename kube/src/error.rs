//! The one error type of ebb's Kubernetes plumbing.

/// A failure talking to the Kubernetes API.
///
/// Discovery never ends on these: watch failures are logged and retried with
/// backoff. They surface from [`crate::client`] (bad kubeconfig) and from
/// [`crate::Recorder`] (an Event the API refused).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No usable kubeconfig or in-cluster configuration.
    #[error("kubernetes client configuration: {0}")]
    Config(#[source] kube::Error),
    /// A request the API server refused or that did not reach it.
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
    /// A list or watch failed (retried by discovery).
    #[error("kubernetes watch: {0}")]
    Watch(#[from] kube::runtime::watcher::Error),
}

impl Error {
    /// A bounded label for the `error` label of ebb's error counters.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Config(_) => "kube_config",
            Self::Api(_) => "kube_api",
            Self::Watch(_) => "kube_watch",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_labels_are_bounded() {
        let status = kube::core::Status::failure("boom", "InternalError").with_code(500);
        let api = Error::Api(kube::Error::Api(Box::new(status)));
        assert_eq!(api.metric_label(), "kube_api");
        let watch = Error::Watch(kube::runtime::watcher::Error::NoResourceVersion);
        assert_eq!(watch.metric_label(), "kube_watch");
        assert!(watch.to_string().starts_with("kubernetes watch: "));
    }
}
