//! Progress events the core emits while it works; renderers in `ui` decide how they look.

use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A step began; `detail` names the object it works on.
    StepStarted {
        step: String,
        detail: String,
    },
    /// A measurement window is running (inspect's rate sampling).
    Sampling {
        what: String,
        #[serde(with = "secs")]
        elapsed: Duration,
        #[serde(with = "secs")]
        total: Duration,
    },
    /// Something the operator should know that does not stop the step.
    Notice {
        level: Level,
        message: String,
    },
    StepFinished {
        step: String,
    },
    /// The forwarding loop's counters.
    Forwarded {
        forwarded: u64,
        in_flight: u64,
        retries: u64,
        /// Messages per second since the loop started.
        rate: f64,
    },
    /// One sample of a queue's depth or a topic's lag (`null` when unknown), with its rates.
    Backlog {
        name: String,
        depth: Option<u64>,
        in_rate: Option<f64>,
        out_rate: Option<f64>,
        eta_secs: Option<f64>,
    },
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warn,
}

/// Receives events; implementations must be cheap because the forwarding loop calls them often.
pub trait ProgressSink: Send + Sync {
    fn emit(&self, event: Event);
}

pub type Progress = Arc<dyn ProgressSink>;

/// Discards every event: for library callers and tests that only want the result.
pub struct Silent;

impl ProgressSink for Silent {
    fn emit(&self, _event: Event) {}
}

pub fn silent() -> Progress {
    Arc::new(Silent)
}

mod secs {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(duration.as_secs_f64())
    }
}
