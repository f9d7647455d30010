//! Renderers of progress events: indicatif on a terminal, plain lines in CI, JSON lines.

use crate::progress::{Event, Level, ProgressSink};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One JSON object per event on stderr, so stdout stays a clean result document.
pub struct JsonLines;

impl ProgressSink for JsonLines {
    fn emit(&self, event: Event) {
        if let Ok(line) = serde_json::to_string(&event) {
            eprintln!("{line}");
        }
    }
}

/// Timestamped lines for logs and CI, where bars would be noise.
pub struct PlainLines;

impl ProgressSink for PlainLines {
    fn emit(&self, event: Event) {
        let text = match event {
            Event::StepStarted { step, detail } => format!("{step}: {detail}"),
            Event::Sampling { .. } => return,
            Event::Notice { level, message } => format!("{}: {message}", level_word(level)),
            Event::StepFinished { step } => format!("{step}: done"),
        };
        eprintln!("{} {text}", utc_timestamp());
    }
}

/// indicatif spinners and bars for an operator at a terminal.
pub struct Bars {
    current: Mutex<Option<ProgressBar>>,
}

impl Bars {
    pub fn new() -> Self {
        Bars {
            current: Mutex::new(None),
        }
    }
}

impl Default for Bars {
    fn default() -> Self {
        Self::new()
    }
}

impl ProgressSink for Bars {
    fn emit(&self, event: Event) {
        let Ok(mut current) = self.current.lock() else {
            return;
        };
        match event {
            Event::StepStarted { step, detail } => {
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {prefix:.bold} {wide_msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_prefix(step);
                bar.set_message(detail);
                bar.enable_steady_tick(Duration::from_millis(120));
                *current = Some(bar);
            }
            Event::Sampling {
                what,
                elapsed,
                total,
            } => {
                if let Some(bar) = current.as_ref() {
                    bar.set_message(format!(
                        "measuring {what}: {:.0}s of {:.0}s",
                        elapsed.as_secs_f64(),
                        total.as_secs_f64()
                    ));
                }
            }
            Event::Notice { level, message } => {
                let line = format!("{}: {message}", level_word(level));
                match current.as_ref() {
                    Some(bar) => bar.println(line),
                    None => eprintln!("{line}"),
                }
            }
            Event::StepFinished { .. } => {
                if let Some(bar) = current.take() {
                    bar.finish_and_clear();
                }
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
