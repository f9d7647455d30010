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
