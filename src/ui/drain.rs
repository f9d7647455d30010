//! Human views of the drain steps' outcomes.

use crate::ops::drain::{
    ExpandOutcome, ForwardOutcome, RestoreOutcome, StopConsumersOutcome, WatchOutcome,
};
use crate::ops::exec::ExecOutcome;
use crate::ops::forward_loop::LoopOutcome;
use crate::ops::inspect::human_secs;
use std::fmt::Write;

fn actions(out: &mut String, dry_run: bool, actions: &[String]) {
    if dry_run {
        let _ = writeln!(out, "dry run: nothing was changed");
    }
    for action in actions {
        let _ = writeln!(out, "  {action}");
    }
}

/// The operator command's own output, so that what kubectl & co. said is not lost.
fn exec_output(out: &mut String, exec: Option<&ExecOutcome>) {
    if let Some(exec) = exec {
        for line in exec.stdout.lines().chain(exec.stderr.lines()) {
            let _ = writeln!(out, "  | {line}");
        }
    }
}

pub fn stop_consumers(outcome: &StopConsumersOutcome) -> String {
    let mut out = format!("stop-consumers '{}'\n", outcome.name);
    actions(&mut out, outcome.dry_run, &outcome.actions);
    exec_output(&mut out, outcome.exec.as_ref());
    out
}

pub fn expand(outcome: &ExpandOutcome) -> String {
    let mut out = format!("expand '{}'\n", outcome.name);
    actions(&mut out, outcome.dry_run, &outcome.actions);
    if !outcome.copied_settings.is_empty() {
        let copied: Vec<String> = outcome
            .copied_settings
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        let _ = writeln!(out, "  settings copied: {}", copied.join(", "));
    }
    for dropped in &outcome.dropped_settings {
        let _ = writeln!(out, "  not copied: {dropped}");
    }
    out
}

pub fn forward(outcome: &ForwardOutcome) -> String {
    let mut out = format!("forward '{}'\n", outcome.name);
    actions(&mut out, outcome.dry_run, &outcome.actions);
    if let Some(result) = &outcome.result {
        let _ = writeln!(
            out,
            "  forwarded {} in {} ({:.0} msg/s), retries {}, stopped by {}",
            result.forwarded,
            human_secs(result.elapsed_secs),
            result.rate,
            result.retries,
            match result.stopped_by {
                crate::ops::forward_loop::StopReason::MaxMessages => "--max-messages",
                crate::ops::forward_loop::StopReason::Idle => "--idle-timeout (source empty)",
                crate::ops::forward_loop::StopReason::Signal => "a stop signal",
            }
        );
        for (target, count) in &result.per_target {
            let _ = writeln!(out, "    {target}: {count}");
        }
        if result.unkeyed > 0 {
            let _ = writeln!(
                out,
                "  {} messages had no key and went round-robin",
                result.unkeyed
            );
        }
        dedup_lines(&mut out, result);
        if result.returned_to_source > 0 {
            let _ = writeln!(
                out,
                "  {} received but unconfirmed messages went back to the source",
                result.returned_to_source
            );
        }
    }
    out
}

/// What duplicate suppression did, if it was on.
pub fn dedup_lines(out: &mut String, result: &LoopOutcome) {
    if result.duplicates_suppressed > 0 {
        let _ = writeln!(
            out,
            "  {} duplicates suppressed (delivered before; acknowledged without publishing)",
            result.duplicates_suppressed
        );
    }
    if result.without_id > 0 {
        let _ = writeln!(
            out,
            "  {} messages had no id and were forwarded without the duplicate check",
            result.without_id
        );
    }
    if let Some(reason) = &result.dedup_bypassed {
        let _ = writeln!(
            out,
            "  duplicate suppression was bypassed (--dedup-optional): {reason}"
        );
    }
}

pub fn watch(outcome: &WatchOutcome) -> String {
    format!(
        "watch '{}': {} after {} samples\n",
        outcome.name,
        if outcome.drained {
            "drained"
        } else {
            "stopped"
        },
        outcome.samples
    )
}

pub fn restore(outcome: &RestoreOutcome) -> String {
    let mut out = format!("restore '{}'\n", outcome.name);
    actions(&mut out, outcome.dry_run, &outcome.actions);
    exec_output(&mut out, outcome.exec.as_ref());
    out
}
