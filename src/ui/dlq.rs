//! Human views of `dlq inspect` reports and `dlq replay` outcomes.

use crate::ops::dlq::{DlqInspectReport, DlqReplayOutcome};
use crate::ops::inspect::{human_secs, Warning};
use std::collections::BTreeMap;
use std::fmt::{Display, Write};

/// One "by ..." table, largest count first (ties by name), at most `MAX_ROWS` rows.
fn table<K: Display + Ord>(out: &mut String, title: &str, counts: &BTreeMap<K, u64>) {
    const MAX_ROWS: usize = 20;
    if counts.is_empty() {
        return;
    }
    let _ = writeln!(out, "  by {title}:");
    let mut rows: Vec<(&K, &u64)> = counts.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (key, count) in rows.iter().take(MAX_ROWS) {
        let _ = writeln!(out, "    {count:>8}  {key}");
    }
    if rows.len() > MAX_ROWS {
        let rest: u64 = rows[MAX_ROWS..].iter().map(|(_, count)| **count).sum();
        let _ = writeln!(
            out,
            "    {rest:>8}  ({} more, see --output json)",
            rows.len() - MAX_ROWS
        );
    }
}

fn warnings(out: &mut String, warnings: &[Warning]) {
    for warning in warnings {
        let _ = writeln!(out, "  WARNING [{}] {}", warning.code, warning.message);
    }
}

pub fn inspect(report: &DlqInspectReport) -> String {
    let mut out = String::new();
    let kind = if report.broker == "kafka" {
        "Kafka topic"
    } else {
        "RabbitMQ queue"
    };
    let _ = writeln!(out, "dead letters in {kind} '{}'", report.name);
    let _ = writeln!(
        out,
        "  examined {} of {}{}",
        report.examined,
        report
            .depth
            .map_or_else(|| "unknown".to_string(), |depth| depth.to_string()),
        if report.complete {
            " (all)"
        } else {
            " (partial)"
        }
    );
    let _ = writeln!(out, "  read: {}", report.method);
    table(&mut out, "reason", &report.by_reason);
    table(&mut out, "original queue", &report.by_queue);
    table(&mut out, "routing key", &report.by_routing_key);
    table(&mut out, "partition", &report.by_partition);
    if report.by_replays.keys().any(|&replays| replays > 0) {
        table(&mut out, "replays so far", &report.by_replays);
    }
    if report.examined > 0 {
        let _ = writeln!(out, "  age (since dead-lettered):");
        for bucket in &report.age.buckets {
            let _ = writeln!(out, "    {:>8}  {}", bucket.count, bucket.label);
        }
        if report.age.unknown > 0 {
            let _ = writeln!(out, "    {:>8}  unknown", report.age.unknown);
        }
        if let (Some(oldest), Some(newest)) = (report.age.oldest_secs, report.age.newest_secs) {
            let _ = writeln!(
                out,
                "    oldest {}, newest {}",
                human_secs(oldest),
                human_secs(newest)
            );
        }
    }
    warnings(&mut out, &report.warnings);
    out
}

pub fn replay(outcome: &DlqReplayOutcome) -> String {
    let mut out = format!(
        "dlq replay '{}' to '{}' (retry budget {})\n",
        outcome.name, outcome.to, outcome.max_retries
    );
    if outcome.dry_run {
        let _ = writeln!(out, "dry run: nothing was moved");
    }
    for action in &outcome.actions {
        let _ = writeln!(out, "  {action}");
    }
    let verb = |done: &str, would: &str| {
        if outcome.dry_run {
            would.to_string()
        } else {
            done.to_string()
        }
    };
    let _ = writeln!(
        out,
        "  {:<13}{:>8}  to '{}'",
        verb("replayed", "would replay"),
        outcome.replayed,
        outcome.to
    );
    if let Some(parking) = &outcome.parking_lot {
        let _ = writeln!(
            out,
            "  {:<13}{:>8}  to '{parking}' (at the budget)",
            verb("parked", "would park"),
            outcome.parked
        );
    }
    if outcome.kept_at_budget > 0 || outcome.parking_lot.is_none() {
        let _ = writeln!(
            out,
            "  {:<13}{:>8}  at the budget (no --parking-lot)",
            verb("left", "would leave"),
            outcome.kept_at_budget
        );
    }
    let _ = writeln!(
        out,
        "  {:<13}{:>8}  not matching --filter",
        verb("skipped", "would skip"),
        outcome.skipped_by_filter
    );
    if let Some(result) = &outcome.result {
        let _ = writeln!(
            out,
            "  in {} ({:.0} msg/s), retries {}, stopped by {}",
            human_secs(result.elapsed_secs),
            result.rate,
            result.retries,
            match result.stopped_by {
                crate::ops::forward_loop::StopReason::MaxMessages => "--max-messages",
                crate::ops::forward_loop::StopReason::Idle =>
                    "--idle-timeout (nothing new in the DLQ)",
                crate::ops::forward_loop::StopReason::Signal => "a stop signal",
            }
        );
        super::drain::dedup_lines(&mut out, result);
        if result.returned_to_source > 0 {
            let _ = writeln!(
                out,
                "  {} received but unconfirmed messages went back to the DLQ",
                result.returned_to_source
            );
        }
    }
    warnings(&mut out, &outcome.warnings);
    out
}
