//! Runs a loaded playbook: each step through the same `ops` functions the subcommands call, with
//! per-step timeouts, background forwards, gates, approvals, the run journal for `--resume`, and
//! `on_failure` when a step fails or the run is cancelled. Never prints: progress goes out as
//! events and the caller renders the returned `RunOutcome`.

use super::condition::{all_hold, Snapshot};
use super::journal::{self, Entry, Journal, RunStatus, StepPrint};
use super::report::Collector;
use super::resume::{self, ResumePlan};
use super::{ApproveSpec, ExecSpec, Operation, Playbook, Step, StopForwardSpec, WaitSpec};
use crate::endpoint::Target;
use crate::error::{exit, Error, Result};
use crate::ops::dlq;
use crate::ops::drain::{self, ForwardOutcome, WatchSample, WatchSpec};
use crate::ops::exec;
use crate::ops::forward_loop::LoopOutcome;
use crate::ops::inspect::{self, InspectReport, InspectSpec};
pub use crate::progress::StepOutcome;
use crate::progress::{Event, Level, Progress, ProgressSink};
use serde::Serialize;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Samples a gate may fail in a row (management API hiccups) before the gate fails.
const GATE_SAMPLE_RETRIES: u32 = 5;
/// A background forward that fails this soon after it started fails its own step.
const BACKGROUND_START_CHECK: Duration = Duration::from_secs(1);

pub struct RunOptions {
    pub dry_run: bool,
    /// Approve every `approve` step without asking.
    pub yes: bool,
    /// Standard input is a terminal, so `approve` may ask.
    pub interactive: bool,
    pub resume: bool,
    pub state_path: PathBuf,
    /// Environment for `exec` steps (MQDRAIN, MQDRAIN_URL), before each step's own `env`.
    pub exec_env: Vec<(String, String)>,
    /// Sample source and temporary depth this often for the report's chart.
    pub sample_every: Option<Duration>,
}

/// Asks the operator a yes/no question (the UI's prompt); runs on a blocking thread.
pub type Approver = Arc<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub index: usize,
    /// `steps` or `on_failure`.
    pub list: &'static str,
    pub name: String,
    pub operation: &'static str,
    pub outcome: StepOutcome,
    /// Unix seconds.
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    pub message: Option<String>,
    /// What was done, or with --dry-run what would be done.
    pub actions: Vec<String>,
    /// The resolved options.
    pub settings: serde_json::Value,
    /// The operation's own outcome document.
    pub result: Option<serde_json::Value>,
    /// Forward steps: the forwarding loop's counters.
    pub forwarded: Option<LoopOutcome>,
    /// Which bounded wait ran out (`gate timeout`, `step timeout`, `exec timeout`, ...): they
    /// all exit 5, so the summary and the JUnit failure say which.
    pub timed_out: Option<String>,
}

impl StepRecord {
    pub fn duration_secs(&self) -> Option<f64> {
        Some(self.finished_at? - self.started_at?)
    }

    /// The outcome in words, naming the wait that ran out for a timeout.
    pub fn outcome_text(&self) -> String {
        match &self.timed_out {
            Some(which) => format!("{} ({which})", self.outcome.word()),
            None => self.outcome.word().to_string(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunOutcome {
    pub name: String,
    pub description: Option<String>,
    pub playbook: String,
    pub broker: String,
    /// What the backlog figures are: `depth` (RabbitMQ: ready + unacked) or `lag` (Kafka: the
    /// group's lag).
    pub measure: &'static str,
    pub dry_run: bool,
    pub resumed: bool,
    pub started_at: f64,
    pub finished_at: f64,
    pub status: RunStatus,
    pub exit_code: u8,
    pub error: Option<String>,
    pub steps: Vec<StepRecord>,
    pub on_failure: Vec<StepRecord>,
    pub state_file: Option<String>,
}

impl RunOutcome {
    /// The error `main` maps to the exit code, `None` on success.
    pub fn error(&self) -> Option<Error> {
        let message = self.error.clone()?;
        Some(match self.exit_code {
            exit::TIMEOUT => Error::Timeout(message),
            exit::CANCELLED => Error::Cancelled,
            exit::USAGE => Error::usage(message),
            _ => Error::Broker(message),
        })
    }
}

fn measure(target: &Target) -> &'static str {
    match target {
        Target::Rabbit(_) => "depth",
        Target::Kafka(_) => "lag",
    }
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or_default()
}

/// What a finished operation reports.
#[derive(Default)]
struct Done {
    actions: Vec<String>,
    message: Option<String>,
    result: Option<serde_json::Value>,
    forwarded: Option<LoopOutcome>,
}

fn json<T: Serialize>(value: &T) -> Option<serde_json::Value> {
    serde_json::to_value(value).ok()
}

struct Background {
    step: usize,
    name: String,
    token: CancellationToken,
    handle: JoinHandle<Result<ForwardOutcome>>,
    scope: Arc<StepScope>,
}

/// Runs `playbook` against `target`. Errors before the first step (a journal that does not
/// match, an approval that cannot be asked) come back as `Err`; a failing step comes back as a
/// `RunOutcome` whose `error()` carries the exit code.
pub async fn run(
    playbook: &Playbook,
    target: &Target,
    options: &RunOptions,
    progress: &Progress,
    collector: Option<Arc<Collector>>,
    cancel: &CancellationToken,
    approver: Approver,
) -> Result<RunOutcome> {
    let fingerprint: Vec<StepPrint> = playbook.steps.iter().map(StepPrint::of).collect();
    let needs_approval = playbook
        .all_steps()
        .any(|step| matches!(step.operation, Operation::Approve(_)));
    if needs_approval && !options.dry_run && !options.yes && !options.interactive {
        return Err(Error::usage(format!(
            "playbook {} has approve steps and standard input is not a terminal: pass --yes to approve them in advance (e.g. in CI), or run it from a terminal",
            playbook.path.display()
        )));
    }
    let previous = if options.dry_run {
        None
    } else {
        Journal::load(&options.state_path)?
    };
    if let Some(previous) = &previous {
        if options.resume {
            for note in previous.resumable(&fingerprint, &options.state_path)? {
                progress.emit(Event::Notice {
                    level: Level::Info,
                    message: note,
                });
            }
        }
        if !options.resume && previous.status != RunStatus::Succeeded {
            let last = previous
                .steps
                .iter()
                .max_by_key(|entry| entry.index)
                .map(|entry| {
                    format!(
                        " (last step recorded: {} '{}', {})",
                        entry.index + 1,
                        entry.name,
                        entry.outcome.word()
                    )
                })
                .unwrap_or_default();
            return Err(Error::usage(format!(
                "an earlier run of this playbook did not finish{last}; journal {}: pass --resume to continue it, or delete the journal to start over",
                options.state_path.display()
            )));
        }
    }
    if options.resume && previous.is_none() && !options.dry_run {
        progress.emit(Event::Notice {
            level: Level::Info,
            message: format!(
                "nothing to resume: no journal at {}; starting from the first step",
                options.state_path.display()
            ),
        });
    }
    let started_at = now();
    let previous = previous.filter(|_| options.resume);
    let plans = match &previous {
        Some(previous) if previous.status == RunStatus::Succeeded => {
            progress.emit(Event::Notice {
                level: Level::Info,
                message: format!(
                    "nothing to resume: the run recorded in {} succeeded; delete the journal (or leave out --resume) to run the playbook again",
                    options.state_path.display()
                ),
            });
            return Ok(already_succeeded(playbook, target, options, started_at));
        }
        Some(previous) => {
            let (plans, warnings) = resume::plan(playbook, &|index| previous.finished(index));
            for warning in warnings {
                progress.emit(Event::Notice {
                    level: Level::Warn,
                    message: warning,
                });
            }
            plans
        }
        None => Vec::new(),
    };
    let journal = (!options.dry_run).then(|| Journal {
        version: journal::VERSION,
        playbook: playbook.path.display().to_string(),
        name: playbook.name.clone(),
        fingerprint: fingerprint.clone(),
        status: RunStatus::Running,
        started_at,
        updated_at: started_at,
        steps: previous
            .as_ref()
            .map(|previous| previous.steps.clone())
            .unwrap_or_default(),
    });
    let mut runner = Runner {
        playbook,
        target,
        options,
        progress: progress.clone(),
        approver,
        journal,
        plans,
        background: Vec::new(),
        steps: Vec::new(),
        on_failure: Vec::new(),
        plan_failures: Vec::new(),
    };
    if let Some(journal) = &runner.journal {
        journal.save(&options.state_path)?;
    }
    let sampler = match (options.sample_every, &collector) {
        (Some(every), Some(collector)) if !options.dry_run => subject(playbook)
            .map(|spec| spawn_sampler(target.clone(), spec, every, collector.clone())),
        _ => None,
    };
    let mut failure = runner.main_steps(cancel).await;
    if failure.is_none() && !runner.plan_failures.is_empty() {
        failure = Some((
            exit::FAILED,
            format!(
                "dry run: {} step(s) could not be planned: {}",
                runner.plan_failures.len(),
                runner.plan_failures.join("; ")
            ),
        ));
    }
    let stop_failure = runner.stop_all_background().await;
    let failure = failure.or(stop_failure);
    if let Some(failure) = &failure {
        if !options.dry_run && !playbook.on_failure.is_empty() {
            progress.emit(Event::Notice {
                level: Level::Warn,
                message: format!(
                    "running {} on_failure step(s) after: {}",
                    playbook.on_failure.len(),
                    failure.1
                ),
            });
            // A fresh token: the run's own may be cancelled, and cleanup must still run (a
            // second signal exits at once).
            runner.on_failure_steps(&CancellationToken::new()).await;
        }
    }
    if let Some(sampler) = sampler {
        sampler.abort();
    }
    let (mut exit_code, mut error) = match &failure {
        Some((code, message)) => (*code, Some(message.clone())),
        None => (exit::OK, None),
    };
    let mut status = match exit_code {
        exit::OK => RunStatus::Succeeded,
        exit::CANCELLED => RunStatus::Cancelled,
        _ => RunStatus::Failed,
    };
    let state_file = runner.journal.as_mut().map(|journal| {
        journal.status = status;
        journal.updated_at = now();
        options.state_path.display().to_string()
    });
    // The steps ran: an unwritable journal must not cost their outcome (nor the JUnit file and
    // report made from it), but the run cannot count as a success either.
    if let Some(Err(save)) = runner
        .journal
        .as_ref()
        .map(|journal| journal.save(&options.state_path))
    {
        let note = format!(
            "{save}; the journal on disk does not show how this run ended, so delete it before running the playbook again"
        );
        match &mut error {
            Some(message) => message.push_str(&format!("; also: {note}")),
            None => {
                error = Some(note);
                exit_code = exit::FAILED;
                status = RunStatus::Failed;
            }
        }
    }
    Ok(RunOutcome {
        name: playbook.name.clone(),
        description: playbook.description.clone(),
        playbook: playbook.path.display().to_string(),
        broker: target.redacted(),
        measure: measure(target),
        dry_run: options.dry_run,
        resumed: options.resume,
        started_at,
        finished_at: now(),
        status,
        exit_code,
        error,
        steps: runner.steps,
        on_failure: runner.on_failure,
        state_file,
    })
}

/// `--resume` of a run that already succeeded: every step is skipped, nothing is touched.
fn already_succeeded(
    playbook: &Playbook,
    target: &Target,
    options: &RunOptions,
    started_at: f64,
) -> RunOutcome {
    let steps = playbook
        .steps
        .iter()
        .map(|step| {
            let mut record = record_for(step, "steps");
            record.outcome = StepOutcome::Skipped;
            record.message = Some("the earlier run succeeded".into());
            record
        })
        .collect();
    RunOutcome {
        name: playbook.name.clone(),
        description: playbook.description.clone(),
        playbook: playbook.path.display().to_string(),
        broker: target.redacted(),
        measure: measure(target),
        dry_run: false,
        resumed: true,
        started_at,
        finished_at: now(),
        status: RunStatus::Succeeded,
        exit_code: exit::OK,
        error: None,
        steps,
        on_failure: Vec::new(),
        state_file: Some(options.state_path.display().to_string()),
    }
}

/// The queue/topic a playbook drains, its temporary prefix and (Kafka) groups, for the chart's
/// sampler.
fn subject(playbook: &Playbook) -> Option<WatchSpec> {
    let (name, temp) = playbook.source()?;
    let (group, temp_group) = playbook.groups_of(name);
    Some(watch_spec(name, group, temp_group, temp))
}

fn watch_spec(
    name: &str,
    group: Option<&str>,
    temp_group: Option<&str>,
    temp: Option<&str>,
) -> WatchSpec {
    WatchSpec {
        name: name.to_string(),
        group: group.map(str::to_string),
        temp_group: temp_group.map(str::to_string),
        temp: temp.map(str::to_string),
        until_drained: false,
        timeout: None,
        interval: Duration::from_secs(1),
    }
}

/// Samples depth (lag) for the chart only; a sample that cannot be taken is skipped.
fn spawn_sampler(
    target: Target,
    spec: WatchSpec,
    every: Duration,
    collector: Arc<Collector>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let sink: Progress = Arc::new(RecordOnly(collector));
        loop {
            if sample_once(&target, &spec, &sink).await.is_err() {
                // A Kafka watch needs the temporary topic, which exists only between expand and
                // restore; the source's lag before and after still belongs on the chart.
                source_sample(&target, &spec, &sink).await;
            }
            tokio::time::sleep(every).await;
        }
    })
}

/// The source's depth (lag) alone, from the code `mqdrain inspect` runs.
async fn source_sample(target: &Target, spec: &WatchSpec, sink: &Progress) {
    let inspect = InspectSpec {
        name: spec.name.clone(),
        group: spec.group.clone(),
        sample: Duration::ZERO,
    };
    let Ok(report) = inspect::execute(target, &inspect, &crate::progress::silent()).await else {
        return;
    };
    let depth = match report {
        InspectReport::Rabbit(queue) => queue.depth,
        InspectReport::Kafka(topic) => topic.lag,
    };
    sink.emit(Event::Backlog {
        name: spec.name.clone(),
        depth,
        in_rate: None,
        out_rate: None,
        eta_secs: None,
    });
}

/// Feeds the collector without showing anything.
struct RecordOnly(Arc<Collector>);

impl ProgressSink for RecordOnly {
    fn emit(&self, event: Event) {
        self.0.record(&event);
    }
}

/// Passes only backlog samples on: a gate's repeated one-shot watches must not open a new
/// spinner per sample.
struct BacklogOnly(Progress);

impl ProgressSink for BacklogOnly {
    fn emit(&self, event: Event) {
        if matches!(event, Event::Backlog { .. }) {
            self.0.emit(event);
        }
    }
}

/// Tracks the operations' StepStarted events so that a step that failed half-way still closes
/// its spinner.
struct StepScope {
    inner: Progress,
    open: Mutex<Vec<String>>,
}

impl StepScope {
    fn new(inner: Progress) -> Arc<StepScope> {
        Arc::new(StepScope {
            inner,
            open: Mutex::new(Vec::new()),
        })
    }

    fn close(&self) {
        let open = match self.open.lock() {
            Ok(mut open) => std::mem::take(&mut *open),
            Err(_) => Vec::new(),
        };
        for step in open.into_iter().rev() {
            self.inner.emit(Event::StepFinished { step });
        }
    }
}

impl ProgressSink for StepScope {
    fn emit(&self, event: Event) {
        if let Ok(mut open) = self.open.lock() {
            match &event {
                Event::StepStarted { step, .. } => open.push(step.clone()),
                Event::StepFinished { step } => {
                    if let Some(at) = open.iter().rposition(|s| s == step) {
                        open.remove(at);
                    }
                }
                _ => {}
            }
        }
        self.inner.emit(event);
    }
}

/// One watch sample, taken by starting a watch and cancelling it from its first sample.
async fn sample_once(
    target: &Target,
    spec: &WatchSpec,
    progress: &Progress,
) -> Result<WatchSample> {
    let stop = CancellationToken::new();
    let mut taken: Option<WatchSample> = None;
    let result = {
        let mut on_sample = |sample: &WatchSample| {
            taken = Some(sample.clone());
            stop.cancel();
        };
        drain::watch(target, spec, progress, &stop, &mut on_sample).await
    };
    match (taken, result) {
        (Some(sample), _) => Ok(sample),
        (None, Err(error)) => Err(error),
        (None, Ok(_)) => Err(Error::Broker(format!(
            "no sample of '{}' could be taken",
            spec.name
        ))),
    }
}

/// Runs `future` unless `cancel` fires first (dropping it stops the work in flight).
async fn cancellable<T>(
    cancel: &CancellationToken,
    future: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        _ = cancel.cancelled() => Err(Error::Cancelled),
        result = future => result,
    }
}

struct Runner<'a> {
    playbook: &'a Playbook,
    target: &'a Target,
    options: &'a RunOptions,
    progress: Progress,
    approver: Approver,
    journal: Option<Journal>,
    /// `--resume`: what to do with each main step; empty otherwise.
    plans: Vec<ResumePlan>,
    background: Vec<Background>,
    steps: Vec<StepRecord>,
    on_failure: Vec<StepRecord>,
    /// --dry-run: steps whose plan failed for a reason the real run would also hit.
    plan_failures: Vec<String>,
}

fn record_for(step: &Step, list: &'static str) -> StepRecord {
    StepRecord {
        index: step.index,
        list,
        name: step.name.clone(),
        operation: step.operation.key(),
        outcome: StepOutcome::NotRun,
        started_at: None,
        finished_at: None,
        message: None,
        actions: Vec::new(),
        settings: serde_json::to_value(&step.operation)
            .ok()
            .and_then(|value| value.get("options").cloned())
            .unwrap_or_default(),
        result: None,
        forwarded: None,
        timed_out: None,
    }
}

/// Names the bounded wait that ran out in `step`.
fn timeout_kind(step: &Step, own_timeout: bool) -> String {
    if own_timeout {
        return "step timeout".into();
    }
    match &step.operation {
        Operation::Wait(_) => "gate timeout".into(),
        Operation::Exec(_) => "exec timeout".into(),
        other => format!("{} wait", other.key()),
    }
}

fn outcome_of(error: &Error) -> StepOutcome {
    match error.exit_code() {
        exit::TIMEOUT => StepOutcome::TimedOut,
        exit::CANCELLED => StepOutcome::Cancelled,
        _ => StepOutcome::Failed,
    }
}

impl Runner<'_> {
    fn notice(&self, level: Level, message: String) {
        self.progress.emit(Event::Notice { level, message });
    }

    fn save_journal(&mut self, record: &StepRecord) {
        let Some(journal) = self.journal.as_mut() else {
            return;
        };
        // on_failure steps are not resumed; a skipped step keeps the entry of the run that did it.
        if record.list != "steps" || record.outcome == StepOutcome::Skipped {
            return;
        }
        journal.record(Entry {
            index: record.index,
            name: record.name.clone(),
            operation: record.operation.to_string(),
            outcome: record.outcome,
            started_at: record.started_at.unwrap_or_default(),
            finished_at: record.finished_at.unwrap_or_default(),
            message: record.message.clone(),
        });
        if let Err(error) = journal.save(&self.options.state_path) {
            self.notice(Level::Warn, error.to_string());
        }
    }

    async fn main_steps(&mut self, cancel: &CancellationToken) -> Option<(u8, String)> {
        let mut failure: Option<(u8, String)> = None;
        for step in &self.playbook.steps {
            let mut record = record_for(step, "steps");
            if failure.is_some() {
                self.steps.push(record);
                continue;
            }
            if cancel.is_cancelled() {
                record.outcome = StepOutcome::Cancelled;
                record.message = Some("cancelled before the step started".into());
                failure = Some((
                    exit::CANCELLED,
                    format!("cancelled before step {} '{}'", step.index + 1, step.name),
                ));
                self.step_finished(&record);
                self.steps.push(record);
                continue;
            }
            if let Some(dead) = self.background_failure().await {
                failure = Some(dead);
                self.steps.push(record);
                continue;
            }
            let plan = self
                .plans
                .get(step.index)
                .cloned()
                .unwrap_or(ResumePlan::Run);
            if let ResumePlan::Skip(reason) = &plan {
                record.outcome = StepOutcome::Skipped;
                record.message = Some(reason.clone());
                self.step_finished(&record);
                self.steps.push(record);
                continue;
            }
            let note = match &plan {
                ResumePlan::Verify(why) => Some(format!("resumed: {why}")),
                _ => None,
            };
            self.step_started(step, "steps", note);
            self.execute(
                step,
                &mut record,
                matches!(plan, ResumePlan::Verify(_)),
                cancel,
            )
            .await;
            if record.outcome.is_failure() && record.outcome != StepOutcome::PlanFailed {
                if step.continue_on_error
                    && matches!(record.outcome, StepOutcome::Failed | StepOutcome::TimedOut)
                {
                    record.outcome = StepOutcome::FailedContinued;
                } else if record.outcome != StepOutcome::FailedContinued {
                    let error = record.message.clone().unwrap_or_default();
                    failure = Some(match record.outcome {
                        StepOutcome::TimedOut => (
                            exit::TIMEOUT,
                            format!(
                                "step {} '{}' ({}:{}) timed out ({}): {error}",
                                step.index + 1,
                                step.name,
                                self.playbook.path.display(),
                                step.pos,
                                record.timed_out.as_deref().unwrap_or("a bounded wait")
                            ),
                        ),
                        StepOutcome::Cancelled => (
                            exit::CANCELLED,
                            format!("cancelled during step {} '{}'", step.index + 1, step.name),
                        ),
                        _ => (
                            exit::FAILED,
                            format!(
                                "step {} '{}' ({}:{}) failed: {error}",
                                step.index + 1,
                                step.name,
                                self.playbook.path.display(),
                                step.pos
                            ),
                        ),
                    });
                }
            }
            self.step_finished(&record);
            self.save_journal(&record);
            self.steps.push(record);
        }
        failure
    }

    fn step_started(&self, step: &Step, list: &'static str, note: Option<String>) {
        self.progress.emit(Event::PlaybookStepStarted {
            list,
            index: step.index + 1,
            total: self.total(list),
            name: step.name.clone(),
            operation: step.operation.key(),
            note,
        });
    }

    fn step_finished(&self, record: &StepRecord) {
        self.progress.emit(Event::PlaybookStepFinished {
            list: record.list,
            index: record.index + 1,
            total: self.total(record.list),
            name: record.name.clone(),
            operation: record.operation,
            outcome: record.outcome,
            duration_secs: record.duration_secs(),
            message: record.message.clone(),
            timed_out: record.timed_out.clone(),
        });
    }

    fn total(&self, list: &str) -> usize {
        if list == "steps" {
            self.playbook.steps.len()
        } else {
            self.playbook.on_failure.len()
        }
    }

    async fn on_failure_steps(&mut self, cancel: &CancellationToken) {
        for step in &self.playbook.on_failure {
            let mut record = record_for(step, "on_failure");
            self.step_started(step, "on_failure", None);
            self.execute(step, &mut record, false, cancel).await;
            self.step_finished(&record);
            self.on_failure.push(record);
        }
    }

    /// Runs one step and fills its record.
    async fn execute(
        &mut self,
        step: &Step,
        record: &mut StepRecord,
        verify_only: bool,
        cancel: &CancellationToken,
    ) {
        record.started_at = Some(now());
        let scope = StepScope::new(self.progress.clone());
        let progress: Progress = scope.clone();
        let work = self.operation(step, &progress, verify_only, cancel);
        let mut own_timeout = false;
        let result = match step.timeout {
            Some(limit) => match tokio::time::timeout(limit, work).await {
                Ok(result) => result,
                Err(_) => {
                    own_timeout = true;
                    Err(Error::Timeout(format!(
                        "did not finish within its timeout of {}; raise the step's `timeout` or find out what it waits for",
                        humantime::format_duration(limit)
                    )))
                }
            },
            None => work.await,
        };
        scope.close();
        record.finished_at = Some(now());
        match result {
            Ok(done) => {
                record.outcome = if self.options.dry_run {
                    StepOutcome::Planned
                } else {
                    StepOutcome::Ok
                };
                record.actions = done.actions;
                record.message = done.message;
                record.result = done.result;
                record.forwarded = done.forwarded;
            }
            Err(error) => {
                record.outcome = if self.options.dry_run {
                    StepOutcome::PlanFailed
                } else {
                    outcome_of(&error)
                };
                record.message = Some(error.to_string());
                if record.outcome == StepOutcome::TimedOut {
                    record.timed_out = Some(timeout_kind(step, own_timeout));
                }
                if self.options.dry_run {
                    // The temporary queues/topic an earlier expand would create do not exist in
                    // a dry run: expected. Anything else is a real problem the run would hit.
                    if self.created_earlier(step, &error) {
                        record.outcome = StepOutcome::PlanDeferred;
                        record.message = Some(format!(
                            "{error} (expected in a dry run: an earlier expand step creates it)"
                        ));
                    } else {
                        self.plan_failures.push(format!(
                            "step {} '{}': {error}",
                            step.index + 1,
                            step.name
                        ));
                    }
                }
            }
        }
    }

    /// Whether `error` is about temporary topology that an expand before `step` creates.
    fn created_earlier(&self, step: &Step, error: &Error) -> bool {
        let Error::NotFound { name, .. } = error else {
            return false;
        };
        self.playbook.steps[..step.index.min(self.playbook.steps.len())]
            .iter()
            .any(|earlier| match &earlier.operation {
                Operation::Expand(expand) => {
                    let temp = expand.temp.as_deref();
                    name.starts_with(&match self.target {
                        Target::Rabbit(_) => {
                            crate::broker::rabbitmq::drain::temp_prefix(&expand.name, temp)
                        }
                        Target::Kafka(_) => {
                            crate::broker::kafka::drain::temp_topic(&expand.name, temp)
                        }
                    })
                }
                _ => false,
            })
    }

    async fn operation(
        &mut self,
        step: &Step,
        progress: &Progress,
        verify_only: bool,
        cancel: &CancellationToken,
    ) -> Result<Done> {
        let target = self.target;
        let dry_run = self.options.dry_run;
        match &step.operation {
            Operation::Inspect(spec) => {
                let report = cancellable(cancel, inspect::execute(target, spec, progress)).await?;
                Ok(Done {
                    actions: vec![inspect_summary(&report)],
                    result: json(&report),
                    ..Done::default()
                })
            }
            Operation::StopConsumers(spec) => {
                let mut spec = spec.clone();
                if verify_only {
                    // Resumed: the stop command already ran; only check the consumers stay gone.
                    spec.exec = None;
                    spec.close_connections = false;
                }
                let outcome = cancellable(
                    cancel,
                    drain::stop_consumers(target, &spec, dry_run, progress),
                )
                .await?;
                Ok(Done {
                    actions: outcome.actions.clone(),
                    result: json(&outcome),
                    ..Done::default()
                })
            }
            Operation::Expand(spec) => {
                let outcome =
                    cancellable(cancel, drain::expand(target, spec, dry_run, progress)).await?;
                Ok(Done {
                    actions: outcome.actions.clone(),
                    result: json(&outcome),
                    ..Done::default()
                })
            }
            Operation::Forward(forward) if forward.background && !dry_run => {
                self.start_background(step, &forward.spec, cancel).await
            }
            Operation::Forward(forward) => {
                let outcome =
                    drain::forward(target, &forward.spec, dry_run, progress, cancel).await?;
                let mut actions = outcome.actions.clone();
                if forward.background {
                    actions.push("would run in the background until a stop-forward step".into());
                }
                Ok(Done {
                    actions,
                    result: json(&outcome),
                    forwarded: outcome.result.clone(),
                    message: outcome.result.as_ref().map(forward_summary),
                })
            }
            Operation::Watch(spec) => {
                let outcome = drain::watch(target, spec, progress, cancel, &mut |_| {}).await?;
                Ok(Done {
                    actions: vec![format!(
                        "{} after {} samples",
                        if outcome.drained {
                            "drained"
                        } else {
                            "stopped"
                        },
                        outcome.samples
                    )],
                    result: json(&outcome),
                    ..Done::default()
                })
            }
            Operation::Restore(spec) => {
                let outcome = drain::restore(target, spec, dry_run, progress, cancel).await?;
                Ok(Done {
                    actions: outcome.actions.clone(),
                    result: json(&outcome),
                    ..Done::default()
                })
            }
            Operation::DlqReplay(spec) => {
                let outcome = dlq::replay(target, spec, dry_run, progress, cancel).await?;
                Ok(Done {
                    actions: outcome.actions.clone(),
                    message: Some(format!(
                        "{}: {} replayed, {} parked, {} left at the budget, {} skipped by the filter",
                        if dry_run { "plan" } else { "done" },
                        outcome.replayed,
                        outcome.parked,
                        outcome.kept_at_budget,
                        outcome.skipped_by_filter
                    )),
                    result: json(&outcome),
                    forwarded: outcome.result.clone(),
                })
            }
            Operation::StopForward(spec) => self.stop_forward(spec).await,
            Operation::Exec(spec) => self.exec(spec, cancel).await,
            Operation::Wait(spec) => self.wait(spec, progress, cancel).await,
            Operation::Approve(spec) => self.approve(spec, cancel).await,
        }
    }

    async fn exec(&self, spec: &ExecSpec, cancel: &CancellationToken) -> Result<Done> {
        let mut env = self.options.exec_env.clone();
        env.extend(
            spec.env
                .iter()
                .map(|(key, value)| (key.clone(), value.clone())),
        );
        if self.options.dry_run {
            let names: Vec<&str> = env.iter().map(|(key, _)| key.as_str()).collect();
            return Ok(Done {
                actions: vec![format!(
                    "would run `{}` with sh -c (timeout {}, expecting exit code {}, environment {})",
                    spec.command,
                    humantime::format_duration(spec.timeout),
                    spec.expect_exit,
                    names.join(", ")
                )],
                ..Done::default()
            });
        }
        let outcome = cancellable(
            cancel,
            exec::run(&spec.command, spec.timeout, &env, spec.expect_exit),
        )
        .await?;
        let mut actions = vec![format!(
            "ran `{}`: exit code {} in {:.1}s",
            spec.command,
            outcome
                .exit_code
                .map_or_else(|| "none".to_string(), |code| code.to_string()),
            outcome.duration_secs
        )];
        // stdout is the command's answer; its stderr (progress, logs) stays in the result.
        let output: Vec<&str> = outcome.stdout.lines().collect();
        for line in output.iter().skip(output.len().saturating_sub(5)) {
            actions.push(format!("| {line}"));
        }
        Ok(Done {
            actions,
            result: json(&outcome),
            ..Done::default()
        })
    }

    async fn approve(&self, spec: &ApproveSpec, cancel: &CancellationToken) -> Result<Done> {
        if self.options.dry_run {
            return Ok(Done {
                actions: vec![format!("would ask for approval: {}", spec.message)],
                ..Done::default()
            });
        }
        if self.options.yes {
            return Ok(Done {
                actions: vec![format!("approved by --yes: {}", spec.message)],
                ..Done::default()
            });
        }
        if !self.options.interactive {
            return Err(Error::usage(
                "approval needed but standard input is not a terminal: pass --yes to approve in advance",
            ));
        }
        let approver = self.approver.clone();
        let message = spec.message.clone();
        let asked = tokio::task::spawn_blocking(move || approver(&message));
        let approved = tokio::select! {
            _ = cancel.cancelled() => return Err(Error::Cancelled),
            answer = asked => answer.unwrap_or(false),
        };
        if approved {
            Ok(Done {
                actions: vec![format!("approved by the operator: {}", spec.message)],
                ..Done::default()
            })
        } else {
            Err(Error::Broker(format!(
                "not approved: {}; the run stops here (resume with --resume once it may go on)",
                spec.message
            )))
        }
    }

    async fn wait(
        &mut self,
        spec: &WaitSpec,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<Done> {
        let conditions = &spec.conditions;
        let wanted = conditions
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" and ");
        let backlog_only: Progress = Arc::new(BacklogOnly(progress.clone()));
        let started = Instant::now();
        let mut in_a_row = 0;
        let mut holding_since: Option<Instant> = None;
        let mut failed_samples = 0;
        loop {
            let snapshot = match self.snapshot(spec, &backlog_only).await {
                Ok(snapshot) => {
                    failed_samples = 0;
                    snapshot
                }
                // A long gate should survive a management API hiccup; a missing queue or a
                // persistent failure ends it.
                Err(error @ (Error::Unreachable { .. } | Error::Broker(_)))
                    if !self.options.dry_run && failed_samples < GATE_SAMPLE_RETRIES =>
                {
                    failed_samples += 1;
                    in_a_row = 0;
                    holding_since = None;
                    self.notice(
                        Level::Warn,
                        format!(
                            "gate sample failed ({failed_samples} of {GATE_SAMPLE_RETRIES} allowed in a row): {error}"
                        ),
                    );
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(Error::Cancelled),
                        _ = tokio::time::sleep(spec.interval) => {}
                    }
                    continue;
                }
                Err(error) => return Err(error),
            };
            let now_text = snapshot.describe(conditions);
            let holds = all_hold(conditions, &snapshot);
            if self.options.dry_run {
                return Ok(Done {
                    actions: vec![format!(
                        "would wait until {wanted} ({} consecutive samples every {} over at least {}{}); now {now_text}: {}",
                        spec.samples,
                        humantime::format_duration(spec.interval),
                        humantime::format_duration(spec.settle),
                        spec.timeout
                            .map(|t| format!(", at most {}", humantime::format_duration(t)))
                            .unwrap_or_default(),
                        if holds { "holds" } else { "does not hold yet" }
                    )],
                    result: json(&snapshot),
                    ..Done::default()
                });
            }
            in_a_row = if holds { in_a_row + 1 } else { 0 };
            let held_for = match (holds, holding_since) {
                (false, _) => {
                    holding_since = None;
                    Duration::ZERO
                }
                (true, None) => {
                    holding_since = Some(Instant::now());
                    Duration::ZERO
                }
                (true, Some(since)) => since.elapsed(),
            };
            if in_a_row >= spec.samples && held_for >= spec.settle {
                return Ok(Done {
                    actions: vec![format!(
                        "{wanted} held on {in_a_row} consecutive samples over {:.1}s, {:.1}s after the gate opened ({now_text})",
                        held_for.as_secs_f64(),
                        started.elapsed().as_secs_f64()
                    )],
                    result: json(&snapshot),
                    ..Done::default()
                });
            }
            // A forward the gate depends on that died makes waiting pointless; one that
            // finished on its own (idle_timeout, max_messages) is fine.
            if let Some((_, message)) = self.background_failure().await {
                return Err(Error::Broker(format!(
                    "{message}; stopped waiting for {wanted} ({now_text})"
                )));
            }
            if let Some(limit) = spec.timeout {
                if started.elapsed() >= limit {
                    return Err(Error::Timeout(format!(
                        "gate `{wanted}` did not hold within {} (now {now_text}); raise the wait's `timeout` or find out why the backlog does not move",
                        humantime::format_duration(limit)
                    )));
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(Error::Cancelled),
                _ = tokio::time::sleep(spec.interval) => {}
            }
        }
    }

    /// Depth from a one-shot watch (the code `mqdrain watch` runs); consumers from inspect.
    async fn snapshot(&self, spec: &WaitSpec, progress: &Progress) -> Result<Snapshot> {
        let watch = watch_spec(
            &spec.name,
            spec.group.as_deref(),
            spec.temp_group.as_deref(),
            spec.temp.as_deref(),
        );
        let sample = sample_once(self.target, &watch, progress).await?;
        let mut snapshot = Snapshot::from_sample(&sample);
        let silent = crate::progress::silent();
        let consumers_of = |name: String, group: Option<String>| {
            let silent = silent.clone();
            async move {
                let report = inspect::execute(
                    self.target,
                    &InspectSpec {
                        name,
                        group,
                        sample: Duration::ZERO,
                    },
                    &silent,
                )
                .await?;
                Ok::<_, Error>(match report {
                    InspectReport::Rabbit(queue) => queue.consumers,
                    InspectReport::Kafka(topic) => {
                        topic.members.map(|members| members.len() as u64)
                    }
                })
            }
        };
        use super::condition::{Metric, Subject};
        let needs = |subject: Subject| {
            spec.conditions
                .iter()
                .any(|c| c.subject == subject && c.metric == Metric::Consumers)
        };
        if needs(Subject::Source) {
            snapshot.source.consumers = consumers_of(spec.name.clone(), spec.group.clone()).await?;
        }
        if needs(Subject::Temporary) && !sample.temporary.is_empty() {
            snapshot.temporary.consumers = match self.target {
                Target::Rabbit(_) => {
                    let mut total = Some(0u64);
                    for backlog in &sample.temporary {
                        let count = match consumers_of(backlog.name.clone(), None).await {
                            Ok(count) => count,
                            // Deleted between the sample and now: nothing consumes it.
                            Err(Error::NotFound { .. }) => Some(0),
                            Err(error) => return Err(error),
                        };
                        total = total.zip(count).map(|(a, b)| a + b);
                    }
                    total
                }
                Target::Kafka(_) => {
                    let topic = spec
                        .temp
                        .clone()
                        .unwrap_or_else(|| format!("{}.drain", spec.name));
                    consumers_of(topic, spec.temp_group.clone()).await?
                }
            };
        }
        Ok(snapshot)
    }

    async fn start_background(
        &mut self,
        step: &Step,
        spec: &drain::ForwardSpec,
        cancel: &CancellationToken,
    ) -> Result<Done> {
        // Its own token: stop-forward stops this forward alone; a signal still reaches it.
        let token = cancel.child_token();
        let scope = StepScope::new(self.progress.clone());
        let task_progress: Progress = scope.clone();
        let target = self.target.clone();
        let task_spec = spec.clone();
        let task_token = token.clone();
        let mut handle = tokio::spawn(async move {
            drain::forward(&target, &task_spec, false, &task_progress, &task_token).await
        });
        // Wrong targets or a missing queue fail at once: make that this step's failure.
        if let Ok(joined) = tokio::time::timeout(BACKGROUND_START_CHECK, &mut handle).await {
            scope.close();
            let outcome = joined.map_err(|error| {
                Error::Broker(format!("the background forward crashed: {error}"))
            })??;
            return Ok(Done {
                actions: outcome.actions.clone(),
                message: outcome
                    .result
                    .as_ref()
                    .map(|result| format!("finished at once: {}", forward_summary(result))),
                result: json(&outcome),
                forwarded: outcome.result.clone(),
            });
        }
        self.background.push(Background {
            step: step.index,
            name: step.name.clone(),
            token,
            handle,
            scope,
        });
        Ok(Done {
            actions: vec![format!(
                "forwarding '{}' in the background until a stop-forward step (or the end of the run) stops it",
                spec.name
            )],
            message: Some("started in the background".into()),
            ..Done::default()
        })
    }

    async fn stop_forward(&mut self, spec: &StopForwardSpec) -> Result<Done> {
        let position = match &spec.forward {
            Some(name) => self.background.iter().position(|b| &b.name == name),
            None => (!self.background.is_empty()).then(|| self.background.len() - 1),
        };
        if self.options.dry_run {
            return Ok(Done {
                actions: vec![format!(
                    "would stop the background forward{} gracefully (in-flight messages are confirmed and acked first) and wait for it",
                    spec.forward.as_ref().map(|name| format!(" '{name}'")).unwrap_or_default()
                )],
                ..Done::default()
            });
        }
        let Some(position) = position else {
            // Resumed after the forward had already been stopped, or it never started.
            return Ok(Done {
                actions: vec!["no background forward is running".into()],
                ..Done::default()
            });
        };
        let background = self.background.remove(position);
        let (name, result) = self.finish_background(background).await;
        let outcome = result?;
        Ok(Done {
            actions: vec![format!("stopped background forward '{name}'")],
            message: outcome.result.as_ref().map(forward_summary),
            result: json(&outcome),
            forwarded: outcome.result.clone(),
        })
    }

    /// Cancels a background forward, waits for it, and puts its counters on its own step.
    async fn finish_background(
        &mut self,
        background: Background,
    ) -> (String, Result<ForwardOutcome>) {
        background.token.cancel();
        let result = match background.handle.await {
            Ok(result) => result,
            Err(error) => Err(Error::Broker(format!(
                "the background forward crashed: {error}"
            ))),
        };
        background.scope.close();
        if let Some(record) = self
            .steps
            .iter_mut()
            .find(|record| record.index == background.step)
        {
            match &result {
                Ok(outcome) => {
                    record.forwarded = outcome.result.clone();
                    record.result = json(outcome);
                    record.message = outcome.result.as_ref().map(forward_summary);
                }
                Err(error) => {
                    record.outcome = StepOutcome::Failed;
                    record.message = Some(error.to_string());
                }
            }
        }
        // The journal said "ok" when the forward started; a forward that failed must say so.
        let failed = self
            .steps
            .iter()
            .find(|record| record.index == background.step && result.is_err())
            .cloned();
        if let Some(record) = failed {
            self.save_journal(&record);
        }
        (background.name, result)
    }

    /// A background forward that ended on its own with an error fails the run at this point.
    async fn background_failure(&mut self) -> Option<(u8, String)> {
        let position = self
            .background
            .iter()
            .position(|b| b.handle.is_finished())?;
        let background = self.background.remove(position);
        let index = background.step;
        let (name, result) = self.finish_background(background).await;
        match result {
            Ok(_) => None,
            Err(error) => Some((
                exit::FAILED,
                format!(
                    "background forward step {} '{name}' failed: {error}",
                    index + 1
                ),
            )),
        }
    }

    /// At the end of a run every background forward still running is stopped gracefully.
    async fn stop_all_background(&mut self) -> Option<(u8, String)> {
        let mut failure = None;
        while let Some(background) = self.background.pop() {
            self.notice(
                Level::Info,
                format!(
                    "stopping background forward '{}' at the end of the run",
                    background.name
                ),
            );
            let index = background.step;
            let (name, result) = self.finish_background(background).await;
            if let Err(error) = result {
                if !matches!(error, Error::Cancelled) {
                    failure = Some((
                        exit::FAILED,
                        format!(
                            "background forward step {} '{name}' failed: {error}",
                            index + 1
                        ),
                    ));
                }
            }
        }
        failure
    }
}

pub fn forward_summary(result: &LoopOutcome) -> String {
    format!(
        "forwarded {} in {:.1}s ({:.0} msg/s), {} retries",
        result.forwarded, result.elapsed_secs, result.rate, result.retries
    )
}

fn inspect_summary(report: &InspectReport) -> String {
    let count = |value: Option<u64>| value.map_or_else(|| "unknown".to_string(), |v| v.to_string());
    match report {
        InspectReport::Rabbit(queue) => format!(
            "queue '{}': depth {} (ready {}, unacked {}), consumers {}, {} warning(s)",
            queue.name,
            count(queue.depth),
            count(queue.ready),
            count(queue.unacked),
            count(queue.consumers),
            queue.warnings.len()
        ),
        InspectReport::Kafka(topic) => format!(
            "topic '{}': lag {}, {} partitions, {} warning(s)",
            topic.name,
            count(topic.lag),
            topic.partitions.len(),
            topic.warnings.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_map_to_the_documented_exit_codes() {
        let playbook = super::super::parse(
            std::path::Path::new("p.yaml"),
            "name: t\nsteps:\n  - exec: {command: 'true'}\n",
            &[],
            &|_| None,
        )
        .unwrap();
        assert_eq!(playbook.steps[0].operation.key(), "exec");
        assert_eq!(
            outcome_of(&Error::Timeout("x".into())),
            StepOutcome::TimedOut
        );
        assert_eq!(outcome_of(&Error::Cancelled), StepOutcome::Cancelled);
        assert_eq!(outcome_of(&Error::usage("x")), StepOutcome::Failed);
    }
}
