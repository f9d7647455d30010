//! Progress events the core emits while it works; renderers in `ui` decide how they look.

use serde::{Deserialize, Serialize};
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
    /// A playbook step began.
    PlaybookStepStarted {
        /// `steps` or `on_failure`.
        list: &'static str,
        /// 1-based, of `total` in its list.
        index: usize,
        total: usize,
        name: String,
        operation: &'static str,
        /// How it runs, when not plainly (`--resume`: what it re-verifies).
        note: Option<String>,
    },
    /// A playbook step ended, or was passed over (skipped on resume: no duration).
    PlaybookStepFinished {
        list: &'static str,
        index: usize,
        total: usize,
        name: String,
        operation: &'static str,
        outcome: StepOutcome,
        duration_secs: Option<f64>,
        /// Why it failed, was skipped, or what it reports.
        message: Option<String>,
        /// Which bounded wait ran out, for `timed_out`.
        timed_out: Option<String>,
    },
}

/// How a playbook step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    Ok,
    /// Failed, but the step has `continue_on_error: true`.
    FailedContinued,
    Failed,
    TimedOut,
    Cancelled,
    /// Not run again by `--resume`: it finished in an earlier run.
    Skipped,
    /// Never reached: an earlier step failed.
    NotRun,
    /// `--dry-run`: what would happen was computed.
    Planned,
    /// `--dry-run`: computing the plan failed for a reason the real run would hit too.
    PlanFailed,
    /// `--dry-run`: cannot be planned because an earlier step would create what it needs (the
    /// temporary queues of an expand). Expected, not a failure.
    PlanDeferred,
}

impl StepOutcome {
    pub fn word(self) -> &'static str {
        match self {
            StepOutcome::Ok => "ok",
            StepOutcome::FailedContinued => "failed (continued)",
            StepOutcome::Failed => "failed",
            StepOutcome::TimedOut => "timed out",
            StepOutcome::Cancelled => "cancelled",
            StepOutcome::Skipped => "skipped",
            StepOutcome::NotRun => "not run",
            StepOutcome::Planned => "planned",
            StepOutcome::PlanFailed => "plan failed",
            StepOutcome::PlanDeferred => "needs an earlier step",
        }
    }

    pub fn is_failure(self) -> bool {
        matches!(
            self,
            StepOutcome::Failed
                | StepOutcome::TimedOut
                | StepOutcome::Cancelled
                | StepOutcome::FailedContinued
                | StepOutcome::PlanFailed
        )
    }
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
