//! The post-incident report (`--report`): a Markdown timeline of the run, backlog figures before
//! and after, forwarding counts and rates, and an SVG chart of depth (Kafka: lag) over time drawn
//! from the samples a `Collector` gathered while the run went on.

use super::runner::{RunOutcome, StepRecord};
use crate::ops::inspect::human_secs;
use crate::progress::{Event, Progress, ProgressSink};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

/// Series colours, chosen to stay apart for the usual 1 source + a few temporary queues.
const COLOURS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// One depth sample of one queue (or topic lag), at Unix seconds `at`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DepthPoint {
    pub at: f64,
    pub name: String,
    pub depth: u64,
}

/// A progress sink that keeps every known depth it sees and passes every event on.
pub struct Collector {
    inner: Progress,
    points: Mutex<Vec<DepthPoint>>,
}

impl Collector {
    pub fn new(inner: Progress) -> Arc<Collector> {
        Arc::new(Collector {
            inner,
            points: Mutex::new(Vec::new()),
        })
    }

    /// Keeps the sample without showing it (the chart's own sampler).
    pub fn record(&self, event: &Event) {
        if let Event::Backlog {
            name,
            depth: Some(depth),
            ..
        } = event
        {
            if let Ok(mut points) = self.points.lock() {
                points.push(DepthPoint {
                    at: super::runner::now(),
                    name: name.clone(),
                    depth: *depth,
                });
            }
        }
    }

    pub fn points(&self) -> Vec<DepthPoint> {
        self.points
            .lock()
            .map(|points| points.clone())
            .unwrap_or_default()
    }
}

impl ProgressSink for Collector {
    fn emit(&self, event: Event) {
        self.record(&event);
        self.inner.emit(event);
    }
}

/// `2026-03-04T05:06:07Z` for Unix seconds.
pub fn utc(secs: f64) -> String {
    let secs = secs.max(0.0) as u64;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// Depth series by queue name, in first-seen order, the source first.
fn series<'a>(
    points: &'a [DepthPoint],
    source: Option<&str>,
) -> Vec<(&'a str, Vec<&'a DepthPoint>)> {
    let mut order: Vec<&str> = Vec::new();
    let mut by_name: BTreeMap<&str, Vec<&DepthPoint>> = BTreeMap::new();
    for point in points {
        if !by_name.contains_key(point.name.as_str()) {
            order.push(&point.name);
        }
        by_name.entry(&point.name).or_default().push(point);
    }
    if let Some(source) = source {
        if let Some(at) = order.iter().position(|name| *name == source) {
            let name = order.remove(at);
            order.insert(0, name);
        }
    }
    order
        .into_iter()
        .map(|name| {
            let mut list = by_name.remove(name).unwrap_or_default();
            list.sort_by(|a, b| a.at.total_cmp(&b.at));
            (name, list)
        })
        .collect()
}

/// A round number at or above `value` for the y axis.
fn nice_ceiling(value: u64) -> u64 {
    if value <= 10 {
        return 10;
    }
    let magnitude = 10u64.pow((value as f64).log10().floor() as u32);
    for step in [1, 2, 5, 10] {
        if step * magnitude >= value {
            return step * magnitude;
        }
    }
    10 * magnitude
}

/// The chart: depth of the source and each temporary queue over the run, steps as markers.
pub fn svg(outcome: &RunOutcome, points: &[DepthPoint], source: Option<&str>) -> String {
    let (width, height) = (860.0, 380.0);
    let (left, right, top, bottom) = (72.0, 24.0, 40.0, 56.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let start = outcome.started_at;
    let end = points
        .iter()
        .map(|p| p.at)
        .fold(outcome.finished_at, f64::max)
        .max(start + 1.0);
    let span = end - start;
    let max_depth = nice_ceiling(points.iter().map(|p| p.depth).max().unwrap_or(0));
    let x = |at: f64| left + (at - start).clamp(0.0, span) / span * plot_w;
    let y = |depth: u64| top + plot_h - depth as f64 / max_depth as f64 * plot_h;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<title>{} over time: {}</title><rect width="100%" height="100%" fill="white"/>"#,
        capitalized(outcome.measure),
        xml(&outcome.name)
    );
    let _ = writeln!(
        out,
        r#"<text x="{left}" y="20" font-size="14" font-weight="bold">{} over time (messages)</text>"#,
        capitalized(outcome.measure)
    );
    for tick in 0..=5 {
        let value = max_depth * tick / 5;
        let ty = y(value);
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{value}</text>"##,
            left + plot_w,
            left - 6.0,
            ty + 4.0
        );
    }
    for tick in 0..=6 {
        let at = start + span * f64::from(tick) / 6.0;
        let tx = x(at);
        let _ = writeln!(
            out,
            r##"<line x1="{tx:.1}" y1="{:.1}" x2="{tx:.1}" y2="{:.1}" stroke="#999"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            top + plot_h,
            top + plot_h + 4.0,
            top + plot_h + 18.0,
            human_secs(at - start)
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">time since the run started</text>"##,
        left + plot_w / 2.0,
        height - 12.0
    );
    // Where each step started: the timeline's steps line up with the curve.
    for record in outcome.steps.iter().chain(outcome.on_failure.iter()) {
        let Some(at) = record.started_at else {
            continue;
        };
        let mx = x(at);
        let label = if record.list == "steps" {
            format!("{}", record.index + 1)
        } else {
            format!("F{}", record.index + 1)
        };
        let _ = writeln!(
            out,
            r##"<line x1="{mx:.1}" y1="{top}" x2="{mx:.1}" y2="{:.1}" stroke="#bbb" stroke-dasharray="3,3"><title>{}</title></line><text x="{:.1}" y="{:.1}" font-size="10" fill="#777">{label}</text>"##,
            top + plot_h,
            xml(&format!(
                "step {label}: {} ({})",
                record.name, record.operation
            )),
            mx + 2.0,
            top + 10.0
        );
    }
    let _ = writeln!(
        out,
        r##"<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>"##
    );
    let all = series(points, source);
    for (number, (name, list)) in all.iter().enumerate() {
        let colour = COLOURS[number % COLOURS.len()];
        let path: Vec<String> = list
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.at), y(p.depth)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline class="series" data-name="{}" fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            xml(name),
            path.join(" ")
        );
        let ly = top + 14.0 + 16.0 * number as f64;
        let lx = left + plot_w - 220.0;
        let _ = writeln!(
            out,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="3" fill="{colour}"/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
            ly - 5.0,
            lx + 18.0,
            xml(name)
        );
    }
    if all.is_empty() {
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#777">no {} samples were taken</text>"##,
            left + plot_w / 2.0,
            top + plot_h / 2.0,
            outcome.measure
        );
    }
    out.push_str("</svg>\n");
    out
}

/// What an inspect step measured, in `measure` (its report's `depth` or `lag`).
fn measured(record: &StepRecord, measure: &str) -> Option<u64> {
    record.result.as_ref()?.get(measure)?.as_u64()
}

fn capitalized(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// The Markdown report. `svg_link` names the chart file written next to the report.
pub fn markdown(
    outcome: &RunOutcome,
    points: &[DepthPoint],
    source: Option<&str>,
    svg_link: Option<&str>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Post-incident report: {}\n", outcome.name);
    if let Some(description) = &outcome.description {
        let _ = writeln!(out, "{description}\n");
    }
    let result = match &outcome.error {
        None => format!("{:?}", outcome.status).to_lowercase(),
        Some(error) => format!(
            "{} (exit {}): {}",
            format!("{:?}", outcome.status).to_lowercase(),
            outcome.exit_code,
            cell(error)
        ),
    };
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| Playbook | `{}` |", cell(&outcome.playbook));
    let _ = writeln!(out, "| Broker | `{}` |", cell(&outcome.broker));
    let _ = writeln!(out, "| Started | {} |", utc(outcome.started_at));
    let _ = writeln!(out, "| Finished | {} |", utc(outcome.finished_at));
    let _ = writeln!(
        out,
        "| Duration | {} |",
        human_secs(outcome.finished_at - outcome.started_at)
    );
    let _ = writeln!(
        out,
        "| Result | {result}{} |",
        if outcome.dry_run { " (dry run)" } else { "" }
    );
    if outcome.resumed {
        let _ = writeln!(out, "| Resumed | yes, from the run journal |");
    }

    let _ = writeln!(out, "\n## Backlog before and after\n");
    let all = series(points, source);
    if all.is_empty() {
        let _ = writeln!(
            out,
            "No {} samples were taken during the run.",
            outcome.measure
        );
    } else {
        // "Before" is the depth (lag) when the drain began changing things (the first stop-consumers,
        // expand or forward), not the first sample: a demo may seed its backlog after that.
        let drain_start = outcome
            .steps
            .iter()
            .filter(|record| matches!(record.operation, "stop-consumers" | "expand" | "forward"))
            .find_map(|record| record.started_at);
        let _ = writeln!(
            out,
            "| Queue / topic ({}) | Before the drain | Peak | After |\n|---|---:|---:|---:|",
            outcome.measure
        );
        for (name, list) in &all {
            let first = drain_start
                .and_then(|start| list.iter().rev().find(|p| p.at <= start))
                .or(list.first())
                .map(|p| p.depth)
                .unwrap_or_default();
            let last = list.last().map(|p| p.depth).unwrap_or_default();
            let peak = list.iter().map(|p| p.depth).max().unwrap_or_default();
            let role = if Some(*name) == source {
                " (source)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "| `{}`{role} | {first} | {peak} | {last} |",
                cell(name)
            );
        }
    }
    let inspected: Vec<String> = outcome
        .steps
        .iter()
        .filter(|record| record.operation == "inspect")
        .filter_map(|record| {
            Some(format!(
                "step {} ({}): {} {} at {}",
                record.index + 1,
                record.name,
                outcome.measure,
                measured(record, outcome.measure)?,
                utc(record.finished_at?)
            ))
        })
        .collect();
    for line in inspected {
        let _ = writeln!(out, "\n- Inspected: {}", cell(&line));
    }

    let forwards: Vec<&StepRecord> = outcome
        .steps
        .iter()
        .filter(|record| record.operation == "forward" && record.forwarded.is_some())
        .collect();
    let _ = writeln!(out, "\n## Forwarding\n");
    if forwards.is_empty() {
        let _ = writeln!(out, "No messages were forwarded in this run.");
    } else {
        let _ = writeln!(
            out,
            "| Step | Forwarded | Duration | Rate (msg/s) | Retries | Returned to source | Per target |\n|---|---:|---:|---:|---:|---:|---|"
        );
        for record in forwards {
            if let Some(loop_outcome) = &record.forwarded {
                let targets: Vec<String> = loop_outcome
                    .per_target
                    .iter()
                    .map(|(target, count)| format!("`{target}`: {count}"))
                    .collect();
                let _ = writeln!(
                    out,
                    "| {} {} | {} | {} | {:.0} | {} | {} | {} |",
                    record.index + 1,
                    cell(&record.name),
                    loop_outcome.forwarded,
                    human_secs(loop_outcome.elapsed_secs),
                    loop_outcome.rate,
                    loop_outcome.retries,
                    loop_outcome.returned_to_source,
                    cell(&targets.join(", "))
                );
            }
        }
    }

    let _ = writeln!(out, "\n## Timeline\n");
    timeline(&mut out, &outcome.steps);
    if !outcome.on_failure.is_empty() {
        let _ = writeln!(out, "\n### on_failure\n");
        timeline(&mut out, &outcome.on_failure);
    }

    let title = format!("{} over time", capitalized(outcome.measure));
    let _ = writeln!(out, "\n## {title}\n");
    if let Some(link) = svg_link {
        let _ = writeln!(out, "![{title}]({link})\n");
    }
    // Inline too, so the report is complete on its own (viewers that render HTML show it).
    out.push_str(&svg(outcome, points, source));
    out
}

/// The report of a run that ended before its first step (invalid playbook, a journal that
/// cannot be resumed, approvals without a terminal): what was refused and why.
pub fn markdown_error(name: &str, playbook: &str, message: &str, exit_code: u8, at: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Post-incident report: {name}\n");
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| Playbook | `{}` |", cell(playbook));
    let _ = writeln!(out, "| Started | {} |", utc(at));
    let _ = writeln!(
        out,
        "| Result | not started (exit {exit_code}): {} |",
        cell(message)
    );
    let _ = writeln!(out, "\nNo step ran, nothing was changed.");
    out
}

fn timeline(out: &mut String, records: &[StepRecord]) {
    let _ = writeln!(
        out,
        "| # | Step | Operation | Started | Finished | Duration | Outcome | Notes |\n|---:|---|---|---|---|---:|---|---|"
    );
    for record in records {
        let notes: Vec<String> = record
            .message
            .iter()
            .cloned()
            .chain(record.actions.iter().take(3).cloned())
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            record.index + 1,
            cell(&record.name),
            record.operation,
            record.started_at.map(utc).unwrap_or_default(),
            record.finished_at.map(utc).unwrap_or_default(),
            record
                .duration_secs()
                .map(|secs| format!("{secs:.1}s"))
                .unwrap_or_default(),
            record.outcome_text(),
            cell(&notes.join("; "))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_ceilings() {
        assert_eq!(utc(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400.0), "2000-02-29T00:00:00Z");
        assert_eq!(nice_ceiling(0), 10);
        assert_eq!(nice_ceiling(4321), 5000);
        assert_eq!(nice_ceiling(1000), 1000);
        assert_eq!(nice_ceiling(1001), 2000);
    }

    #[test]
    fn collector_keeps_known_depths_only() {
        let collector = Collector::new(crate::progress::silent());
        for depth in [Some(5), None] {
            collector.emit(Event::Backlog {
                name: "q".into(),
                depth,
                in_rate: None,
                out_rate: None,
                eta_secs: None,
            });
        }
        let points = collector.points();
        assert_eq!(points.len(), 1);
        assert_eq!(points[0].depth, 5);
        let grouped = series(&points, Some("q"));
        assert_eq!(grouped[0].0, "q");
    }
}
