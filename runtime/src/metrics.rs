//! [`metrics!`](crate::metrics): a struct of Prometheus handles and the
//! function that registers them, written once per metric.

/// Declares a struct of `prometheus-client` handles and its
/// `register(registry: &mut Registry) -> Self`, which creates each metric and
/// registers it into `registry`, in field order.
///
/// Each field reads `name: Type as "metric_name"`, optionally followed by
/// `= init` when `Type::default()` will not do (a histogram's buckets). The
/// first line of the field's doc comment is the metric's help text (the
/// registry ends it with a full stop), so a metric is described once; further
/// doc lines are for readers of the code.
///
/// ```
/// use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
///
/// ebb_runtime::metrics! {
///     pub struct Metrics {
///         /// Ticks fired.
///         pub fires: Counter as "ticks_fired",
///         /// How late a tick fired
///         ///
///         /// From 1 ms to about 1 s.
///         lateness: Histogram as "tick_lateness_seconds"
///             = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 10)),
///     }
/// }
///
/// let mut registry = prometheus_client::registry::Registry::default();
/// let m = Metrics::register(&mut registry);
/// m.fires.inc();
/// let text = ebb_runtime::encode_metrics(&registry);
/// assert!(text.contains("# HELP ticks_fired Ticks fired.\n"), "{text}");
/// assert!(text.contains("# HELP tick_lateness_seconds How late a tick fired.\n"));
/// assert!(text.contains("ticks_fired_total 1\n"), "{text}");
/// ```
#[macro_export]
macro_rules! metrics {
    (
        $(#[$attr:meta])*
        $vis:vis struct $name:ident {
            $(
                #[doc = $help:literal]
                $(#[doc = $doc:literal])*
                $field_vis:vis $field:ident: $ty:ty as $metric:literal $(= $init:expr)?,
            )*
        }
    ) => {
        $(#[$attr])*
        $vis struct $name {
            $(
                #[doc = $help]
                $(#[doc = $doc])*
                $field_vis $field: $ty,
            )*
        }

        impl $name {
            /// Creates every metric and registers it into `registry`.
            $vis fn register(registry: &mut ::prometheus_client::registry::Registry) -> Self {
                let m = Self {
                    $($field: $crate::metrics!(@init $($init)?),)*
                };
                $(registry.register($metric, $crate::help($help), m.$field.clone());)*
                m
            }
        }
    };
    (@init) => {
        ::std::default::Default::default()
    };
    (@init $init:expr) => {
        $init
    };
}

/// A doc comment's line as help text: without the space after `///` and
/// without a closing full stop, which the registry adds.
#[doc(hidden)]
pub fn help(doc: &str) -> &str {
    let doc = doc.trim();
    doc.strip_suffix('.').unwrap_or(doc)
}
