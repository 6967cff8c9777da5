//! The worker's own refusals, as the worker writes them and a connector reads
//! them: `429` with `ebb-worker: busy` (at max in-flight) and `503` with
//! `ebb-worker: draining` (shutting down) are backpressure and holds, not
//! failed attempts; a 429 or 503 without this header is the handler's own
//! answer, an ordinary retryable failure.

/// The header on every answer the worker gives itself instead of the handler.
pub const HEADER: &str = "ebb-worker";

/// `429` at max in-flight: the call was not started; try again soon.
pub const BUSY: &str = "busy";

/// `503` while draining: the call was not started (or was cut off at the end
/// of the drain timeout); send it to another replica.
pub const DRAINING: &str = "draining";

/// `413`: the request body is larger than the worker's `--max-body`.
pub const TOO_LARGE: &str = "too-large";

/// `502`: the handler's answer is larger than the worker's `--max-body`; it
/// was not sent (in fork mode the handler was killed). An ordinary failed
/// attempt, not backpressure.
pub const OUTPUT_TOO_LARGE: &str = "output-too-large";
