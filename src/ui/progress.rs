//! Renderers of progress events: indicatif on a terminal, plain lines in CI, JSON lines.

use crate::ops::inspect::human_secs;
use crate::progress::{Event, Level, ProgressSink};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Plain output repeats a counter line at most this often per counter.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// One JSON object per event on stderr, so stdout stays a clean result document.
pub struct JsonLines;

impl ProgressSink for JsonLines {
    fn emit(&self, event: Event) {
        if let Ok(line) = serde_json::to_string(&event) {
            super::err_line(&line);
        }
    }
}

/// Timestamped lines for logs and CI, where bars would be noise.
#[derive(Default)]
pub struct PlainLines {
    last_printed: Mutex<HashMap<String, Instant>>,
}

impl PlainLines {
    /// True when the counter `name` was not printed within `PLAIN_EVERY`.
    fn due(&self, name: &str) -> bool {
        let Ok(mut last) = self.last_printed.lock() else {
            return true;
        };
        let now = Instant::now();
        match last.get(name) {
            Some(at) if now.duration_since(*at) < PLAIN_EVERY => false,
            _ => {
                last.insert(name.to_string(), now);
                true
            }
        }
    }
}

impl ProgressSink for PlainLines {
    fn emit(&self, event: Event) {
        let text = match event {
            Event::StepStarted { step, detail } => format!("{step}: {detail}"),
            Event::Sampling { .. } => return,
            Event::Notice { level, message } => format!("{}: {message}", level_word(level)),
            Event::StepFinished { step } => format!("{step}: done"),
            Event::Forwarded {
                forwarded,
                in_flight,
                retries,
                rate,
            } => {
                if !self.due("forwarded") {
                    return;
                }
                format!("forwarded {forwarded} ({rate:.0} msg/s, {in_flight} in flight, {retries} retries)")
            }
            Event::Backlog {
                name,
                depth,
                in_rate,
                out_rate,
                eta_secs,
            } => {
                if !self.due(&name) {
                    return;
                }
                backlog_line(&name, depth, in_rate, out_rate, eta_secs)
            }
            step @ (Event::PlaybookStepStarted { .. } | Event::PlaybookStepFinished { .. }) => {
                match playbook_step_line(&step) {
                    Some(line) => line,
                    None => return,
                }
            }
        };
        super::err_line(&format!("{} {text}", utc_timestamp()));
    }
}

/// A playbook step starting or ending, as a note (or a warning when it failed).
fn playbook_step_line(event: &Event) -> Option<String> {
    let place = |list: &str, index: usize, total: usize, name: &str| {
        let list = if list == "steps" { "step" } else { list };
        format!("{list} {index}/{total} '{name}'")
    };
    Some(match event {
        Event::PlaybookStepStarted {
            list,
            index,
            total,
            name,
            operation,
            note,
        } => format!(
            "{}: {}: {operation}{}",
            level_word(Level::Info),
            place(list, *index, *total, name),
            note.as_ref()
                .map(|note| format!(" ({note})"))
                .unwrap_or_default()
        ),
        Event::PlaybookStepFinished {
            list,
            index,
            total,
            name,
            outcome,
            duration_secs,
            message,
            timed_out,
            ..
        } => {
            let level = if outcome.is_failure() {
                Level::Warn
            } else {
                Level::Info
            };
            let word = match timed_out {
                Some(which) => format!("{} ({which})", outcome.word()),
                None => outcome.word().to_string(),
            };
            let time = duration_secs
                .map(|secs| {
                    if outcome.is_failure() {
                        format!(" after {secs:.1}s")
                    } else {
                        format!(" in {secs:.1}s")
                    }
                })
                .unwrap_or_default();
            let why = message
                .as_ref()
                .filter(|_| outcome.is_failure() || duration_secs.is_none())
                .map(|message| format!(": {message}"))
                .unwrap_or_default();
            format!(
                "{}: {}: {word}{time}{why}",
                level_word(level),
                place(list, *index, *total, name)
            )
        }
        _ => return None,
    })
}

fn backlog_line(
    name: &str,
    depth: Option<u64>,
    in_rate: Option<f64>,
    out_rate: Option<f64>,
    eta_secs: Option<f64>,
) -> String {
    let rate = |value: Option<f64>| value.map_or_else(|| "?".to_string(), |v| format!("{v:.0}/s"));
    format!(
        "{name}: depth {} in {} out {} eta {}",
        depth.map_or_else(|| "unknown".to_string(), |d| d.to_string()),
        rate(in_rate),
        rate(out_rate),
        eta_secs.map_or_else(|| "-".to_string(), human_secs)
    )
}

/// indicatif spinners and bars for an operator at a terminal.
pub struct Bars {
    multi: MultiProgress,
    state: Mutex<BarState>,
}

#[derive(Default)]
struct BarState {
    step: Option<ProgressBar>,
    forwarded: Option<ProgressBar>,
    backlogs: HashMap<String, ProgressBar>,
}

impl Bars {
    pub fn new() -> Self {
        Bars {
            multi: MultiProgress::new(),
            state: Mutex::new(BarState::default()),
        }
    }

    fn bar(&self, template: &str) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(0));
        bar.set_style(
            ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    }
}

impl Default for Bars {
    fn default() -> Self {
        Self::new()
    }
}

impl ProgressSink for Bars {
    fn emit(&self, event: Event) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        match event {
            Event::StepStarted { step, detail } => {
                let bar = self.bar("{spinner} {prefix:.bold} {wide_msg}");
                bar.set_prefix(step);
                bar.set_message(detail);
                bar.enable_steady_tick(Duration::from_millis(120));
                state.step = Some(bar);
            }
            Event::Sampling {
                what,
                elapsed,
                total,
            } => {
                if let Some(bar) = state.step.as_ref() {
                    bar.set_message(format!(
                        "measuring {what}: {:.0}s of {:.0}s",
                        elapsed.as_secs_f64(),
                        total.as_secs_f64()
                    ));
                }
            }
            Event::Notice { level, message } => {
                let _ = self
                    .multi
                    .println(format!("{}: {message}", level_word(level)));
            }
            step @ (Event::PlaybookStepStarted { .. } | Event::PlaybookStepFinished { .. }) => {
                if let Some(line) = playbook_step_line(&step) {
                    let _ = self.multi.println(line);
                }
            }
            Event::StepFinished { .. } => {
                if let Some(bar) = state.step.take() {
                    bar.finish_and_clear();
                }
                for (_, bar) in state.backlogs.drain() {
                    bar.finish();
                }
                if let Some(bar) = state.forwarded.take() {
                    bar.finish();
                }
            }
            Event::Forwarded {
                forwarded,
                in_flight,
                retries,
                rate,
            } => {
                let bar = state
                    .forwarded
                    .get_or_insert_with(|| self.bar("forwarded {bar:30.green} {pos}/{len} {msg}"));
                bar.set_position(forwarded);
                if bar.length().unwrap_or(0) < forwarded {
                    bar.set_length(forwarded);
                }
                bar.set_message(format!(
                    "{rate:.0} msg/s, {in_flight} in flight, {retries} retries"
                ));
            }
            Event::Backlog {
                name,
                depth,
                in_rate,
                out_rate,
                eta_secs,
            } => {
                if let (Some(depth), Some(forwarded)) = (depth, state.forwarded.as_ref()) {
                    // The forward bar's total is what is done plus what is left at the source.
                    forwarded.set_length(forwarded.position() + depth);
                }
                let bar = match state.backlogs.get(&name) {
                    Some(bar) => bar.clone(),
                    None => {
                        let bar = self.bar("{prefix:>24} {bar:30.cyan} {msg}");
                        bar.set_prefix(name.clone());
                        state.backlogs.insert(name.clone(), bar.clone());
                        bar
                    }
                };
                if let Some(depth) = depth {
                    // Bars show what has drained: the peak depth seen is the full length.
                    if bar.length().unwrap_or(0) < depth {
                        bar.set_length(depth);
                    }
                    bar.set_position(bar.length().unwrap_or(0).saturating_sub(depth));
                }
                bar.set_message(
                    backlog_line("", depth, in_rate, out_rate, eta_secs)
                        .trim_start_matches(": ")
                        .to_string(),
                );
            }
        }
    }
}

fn level_word(level: Level) -> &'static str {
    match level {
        Level::Info => "note",
        Level::Warn => "warning",
    }
}

/// RFC 3339 UTC time of day without pulling in a date crate.
pub fn utc_timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_516), (2026, 3, 4));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
