//! `mqdrain playbook` and `mqdrain load` at the terminal: loads the playbook, wires the progress
//! renderer (wrapped by the report's depth collector), asks approvals, writes the JUnit and
//! report files, and renders the outcome.

use crate::cli::playbook::{LoadArgs, LoadCommand, PlaybookArgs, PlaybookCommand, RunArgs};
use crate::cli::{ConnectionArgs, OutputFormat};
use crate::error::{Error, Result};
use crate::ops::load::{self, LoadOutcome};
use crate::playbook::report::Collector;
use crate::playbook::runner::{self, Approver, RunOptions, RunOutcome, StepRecord};
use crate::playbook::{self, journal, junit, report, BrokerSpec, Playbook};
use crate::progress::Progress;
use std::fmt::Write as _;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub async fn command(
    args: &PlaybookArgs,
    connection: &ConnectionArgs,
    format: OutputFormat,
    cancel: &CancellationToken,
) -> Result<()> {
    match &args.command {
        PlaybookCommand::Check(check) => {
            let playbook = match playbook::load(&check.file, &check.vars, &playbook::process_env) {
                Ok(playbook) => playbook,
                Err(invalid) => {
                    if format == OutputFormat::Json {
                        // Machine-readable problems, one object each, instead of one long text.
                        json_out(&serde_json::json!({
                            "valid": false,
                            "diagnostics": invalid.diagnostics,
                            "exit_code": crate::error::exit::USAGE,
                        }));
                        super::result_document_printed();
                    }
                    return Err(invalid.into());
                }
            };
            match format {
                OutputFormat::Json => json_out(&serde_json::json!({
                    "valid": true,
                    "playbook": playbook,
                })),
                OutputFormat::Human => super::out(&check_summary(&playbook)),
            }
            Ok(())
        }
        PlaybookCommand::Run(run) => run_playbook(run, connection, format, cancel).await,
    }
}

fn json_out<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => super::out(&format!("{text}\n")),
        Err(error) => super::err_line(&format!("mqdrain: cannot encode JSON: {error}")),
    }
}

fn check_summary(playbook: &Playbook) -> String {
    let mut out = format!(
        "{}: ok — '{}', {} step(s){}\n",
        playbook.path.display(),
        playbook.name,
        playbook.steps.len(),
        if playbook.on_failure.is_empty() {
            String::new()
        } else {
            format!(", {} on_failure step(s)", playbook.on_failure.len())
        }
    );
    for step in &playbook.steps {
        let _ = writeln!(
            out,
            "  {:>2}. {} ({}{})",
            step.index + 1,
            step.name,
            step.operation.key(),
            step.timeout
                .map(|t| format!(", timeout {}", humantime::format_duration(t)))
                .unwrap_or_default()
        );
    }
    out
}

/// Asks on the terminal; anything but y/yes is a no.
fn prompt(message: &str) -> bool {
    {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "approve: {message} [y/N] ");
        let _ = err.flush();
    }
    let mut answer = String::new();
    if std::io::stdin().lock().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

async fn run_playbook(
    args: &RunArgs,
    connection: &ConnectionArgs,
    format: OutputFormat,
    cancel: &CancellationToken,
) -> Result<()> {
    let started_at = runner::now();
    let playbook = match playbook::load(&args.file, &args.vars, &playbook::process_env) {
        Ok(playbook) => playbook,
        Err(invalid) => {
            let name = args.file.display().to_string();
            return Err(not_started(args, &name, invalid.into(), started_at));
        }
    };
    let fallback = BrokerSpec {
        url: connection.url.clone(),
        management_url: connection.management_url.clone(),
        client_config: connection.client_config.clone(),
        ca_file: connection.ca_file.clone(),
    };
    let target = match playbook.target(&fallback) {
        Ok(target) => target,
        Err(error) => return Err(not_started(args, &playbook.name, error, started_at)),
    };
    // exec steps can call this very binary against the same broker: `$MQDRAIN load ...`.
    let mut exec_env = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        exec_env.push(("MQDRAIN".to_string(), exe.display().to_string()));
    }
    let (url, management_url) = match &playbook.broker.url {
        Some(url) => (Some(url.clone()), playbook.broker.management_url.clone()),
        None => (fallback.url.clone(), fallback.management_url.clone()),
    };
    if let Some(url) = url {
        exec_env.push(("MQDRAIN_URL".to_string(), url));
    }
    if let Some(management_url) = management_url {
        exec_env.push(("MQDRAIN_MANAGEMENT_URL".to_string(), management_url));
    }
    let collector = Collector::new(super::progress_for(format));
    let progress: Progress = collector.clone();
    let options = RunOptions {
        dry_run: args.dry_run,
        yes: args.yes,
        interactive: std::io::stdin().is_terminal() && std::io::stderr().is_terminal(),
        resume: args.resume,
        state_path: args
            .state
            .clone()
            .unwrap_or_else(|| journal::default_path(&args.file)),
        exec_env,
        sample_every: args.report.as_ref().map(|_| args.sample_every),
    };
    let approver: Approver = Arc::new(prompt);
    let outcome = match runner::run(
        &playbook,
        &target,
        &options,
        &progress,
        Some(collector.clone()),
        cancel,
        approver,
    )
    .await
    {
        Ok(outcome) => outcome,
        Err(error) => return Err(not_started(args, &playbook.name, error, started_at)),
    };
    let mut write_error = None;
    if let Some(path) = &args.junit {
        if let Err(error) = write_file(path, &junit::render(&outcome)) {
            write_error = Some(error);
        }
    }
    if let Some(path) = &args.report {
        let points = collector.points();
        let source = playbook.source().map(|(name, _)| name);
        let svg_path = path.with_extension("svg");
        let link = svg_path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned());
        let written =
            write_file(&svg_path, &report::svg(&outcome, &points, source)).and_then(|()| {
                write_file(
                    path,
                    &report::markdown(&outcome, &points, source, link.as_deref()),
                )
            });
        if let Err(error) = written {
            write_error = Some(error);
        }
    }
    match format {
        OutputFormat::Json => {
            json_out(&outcome);
            super::result_document_printed();
        }
        OutputFormat::Human => super::out(&render(&outcome)),
    }
    match (outcome.error(), write_error) {
        (Some(error), Some(write)) => {
            super::err_line(&format!("mqdrain: error: {write}"));
            Err(error)
        }
        (Some(error), None) => Err(error),
        (None, Some(write)) => Err(write),
        (None, None) => Ok(()),
    }
}

/// A run that ended before its first step still leaves the JUnit file and the report it was
/// asked for, saying why; returns the error for the exit code.
fn not_started(args: &RunArgs, name: &str, error: Error, started_at: f64) -> Error {
    let message = error.to_string();
    let written = [
        args.junit.as_ref().map(|path| {
            write_file(
                path,
                &junit::render_error(name, &message, error.exit_code(), started_at),
            )
        }),
        args.report.as_ref().map(|path| {
            let playbook = args.file.display().to_string();
            write_file(
                path,
                &report::markdown_error(name, &playbook, &message, error.exit_code(), started_at),
            )
        }),
    ];
    for failed in written.into_iter().flatten().filter_map(Result::err) {
        super::err_line(&format!("mqdrain: error: {failed}"));
    }
    error
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|error| {
        Error::Broker(format!(
            "cannot write {}: {error}; check the directory exists and is writable",
            path.display()
        ))
    })
}

fn settings_line(settings: &serde_json::Value) -> String {
    let Some(map) = settings.as_object() else {
        return String::new();
    };
    map.iter()
        .filter(|(_, value)| !value.is_null())
        .filter(|(_, value)| !value.as_array().is_some_and(|list| list.is_empty()))
        .filter(|(_, value)| !value.as_object().is_some_and(|map| map.is_empty()))
        .map(|(key, value)| match value {
            serde_json::Value::String(text) => format!("{key}={text}"),
            other => format!("{key}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn render_record(out: &mut String, record: &StepRecord, dry_run: bool) {
    let _ = writeln!(
        out,
        "  {:>2}. {:<32} {:<15} {:<18} {}",
        record.index + 1,
        record.name,
        record.operation,
        record.outcome_text(),
        record
            .duration_secs()
            .map(|secs| format!("{secs:.1}s"))
            .unwrap_or_default()
    );
    if dry_run {
        let settings = settings_line(&record.settings);
        if !settings.is_empty() {
            let _ = writeln!(out, "      settings: {settings}");
        }
    }
    if let Some(message) = &record.message {
        let _ = writeln!(out, "      {message}");
    }
    for action in &record.actions {
        let _ = writeln!(out, "      - {action}");
    }
}

pub fn render(outcome: &RunOutcome) -> String {
    let mut out = format!(
        "playbook '{}' ({}) on {}: {}{} in {}\n",
        outcome.name,
        outcome.playbook,
        outcome.broker,
        format!("{:?}", outcome.status).to_lowercase(),
        if outcome.dry_run {
            " (dry run: nothing was changed)"
        } else {
            ""
        },
        crate::ops::inspect::human_secs(outcome.finished_at - outcome.started_at)
    );
    for record in &outcome.steps {
        render_record(&mut out, record, outcome.dry_run);
    }
    if !outcome.on_failure.is_empty() {
        let _ = writeln!(out, "on_failure:");
        for record in &outcome.on_failure {
            render_record(&mut out, record, outcome.dry_run);
        }
    }
    if let Some(state) = &outcome.state_file {
        let _ = writeln!(out, "journal: {state}");
    }
    out
}

pub async fn load_command(
    args: &LoadArgs,
    target: &crate::endpoint::Target,
    format: OutputFormat,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<()> {
    let outcome = match &args.command {
        LoadCommand::Publish(publish) => {
            load::publish(target, &publish.into(), progress, cancel).await?
        }
        LoadCommand::Consume(consume) => {
            load::consume(target, &consume.into(), progress, cancel).await?
        }
    };
    match format {
        OutputFormat::Json => json_out(&outcome),
        OutputFormat::Human => super::out(&load_line(&outcome)),
    }
    Ok(())
}

fn load_line(outcome: &LoadOutcome) -> String {
    format!(
        "'{}': {} messages in {:.1}s ({:.0} msg/s), stopped by {}\n",
        outcome.queue, outcome.messages, outcome.elapsed_secs, outcome.rate, outcome.stopped_by
    )
}
