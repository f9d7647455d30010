//! JUnit XML of a run (`--junit`): one testcase per step, so CI systems show a playbook run
//! like a test suite — failures with their message, skipped and never-reached steps as skipped,
//! and a run that failed outside any step (before the first, or its journal) as an error case.

use super::runner::{RunOutcome, StepOutcome, StepRecord};
use std::fmt::Write;

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 cannot carry most control characters, even escaped.
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\r' | '\t') => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn testcase(out: &mut String, suite: &str, record: &StepRecord) {
    let classname = if record.list == "steps" {
        suite.to_string()
    } else {
        format!("{suite}.on_failure")
    };
    let _ = write!(
        out,
        r#"    <testcase classname="{}" name="{}" time="{:.3}""#,
        escape(&classname),
        escape(&format!(
            "{:02} {} ({})",
            record.index + 1,
            record.name,
            record.operation
        )),
        record.duration_secs().unwrap_or(0.0)
    );
    let message = record.message.clone().unwrap_or_default();
    let body = record.actions.join("\n");
    match record.outcome {
        StepOutcome::Ok | StepOutcome::Planned => {
            if body.is_empty() {
                out.push_str("/>\n");
            } else {
                let _ = write!(
                    out,
                    ">\n      <system-out>{}</system-out>\n    </testcase>\n",
                    escape(&body)
                );
            }
        }
        StepOutcome::Skipped | StepOutcome::NotRun | StepOutcome::PlanDeferred => {
            let reason = match record.outcome {
                StepOutcome::NotRun => "not run: an earlier step failed".to_string(),
                StepOutcome::PlanDeferred => format!("not planned in the dry run: {message}"),
                _ => format!("skipped on resume: {message}"),
            };
            let _ = write!(
                out,
                ">\n      <skipped message=\"{}\"/>\n    </testcase>\n",
                escape(&reason)
            );
        }
        outcome => {
            let kind = match outcome {
                StepOutcome::TimedOut => "timeout",
                StepOutcome::Cancelled => "cancelled",
                _ => "failure",
            };
            let word = record.outcome_text();
            let _ = write!(
                out,
                ">\n      <failure message=\"{}\" type=\"{kind}\">{}</failure>\n    </testcase>\n",
                escape(&format!("{word}: {message}")),
                escape(&format!("{message}\n{body}"))
            );
        }
    }
}

pub fn render(outcome: &RunOutcome) -> String {
    let records: Vec<&StepRecord> = outcome
        .steps
        .iter()
        .chain(outcome.on_failure.iter())
        .collect();
    let suite = suite_name(&outcome.name);
    let mut cases = String::new();
    for record in &records {
        testcase(&mut cases, &suite, record);
    }
    // A run that failed without a failed step (its journal could not be written): CI must see
    // why it exited non-zero.
    let step_failed = records.iter().any(|record| {
        matches!(
            record.outcome,
            StepOutcome::Failed
                | StepOutcome::TimedOut
                | StepOutcome::Cancelled
                | StepOutcome::PlanFailed
        )
    });
    let run_error = outcome.error.as_deref().filter(|_| !step_failed);
    if let Some(message) = run_error {
        error_case(&mut cases, &suite, message, outcome.exit_code);
    }
    let counts = Counts {
        tests: records.len() + usize::from(run_error.is_some()),
        failures: records
            .iter()
            .filter(|record| record.outcome.is_failure())
            .count(),
        errors: usize::from(run_error.is_some()),
        skipped: records
            .iter()
            .filter(|record| {
                matches!(
                    record.outcome,
                    StepOutcome::Skipped | StepOutcome::NotRun | StepOutcome::PlanDeferred
                )
            })
            .count(),
    };
    document(
        &suite,
        outcome.started_at,
        outcome.finished_at - outcome.started_at,
        &counts,
        &cases,
    )
}

/// A run that ended before its first step (invalid playbook, a journal that cannot be resumed,
/// approvals without a terminal): one error case, so CI shows why.
pub fn render_error(name: &str, message: &str, exit_code: u8, at: f64) -> String {
    let suite = suite_name(name);
    let mut cases = String::new();
    error_case(&mut cases, &suite, message, exit_code);
    let counts = Counts {
        tests: 1,
        failures: 0,
        errors: 1,
        skipped: 0,
    };
    document(&suite, at, 0.0, &counts, &cases)
}

struct Counts {
    tests: usize,
    failures: usize,
    errors: usize,
    skipped: usize,
}

fn suite_name(name: &str) -> String {
    format!("playbook.{}", name.replace(' ', "_"))
}

fn error_case(out: &mut String, suite: &str, message: &str, exit_code: u8) {
    let _ = write!(
        out,
        "    <testcase classname=\"{suite}\" name=\"run\" time=\"0.000\">\n      <error message=\"{message}\" type=\"exit {exit_code}\">{message}</error>\n    </testcase>\n",
        suite = escape(suite),
        message = escape(message),
    );
}

fn document(suite: &str, started_at: f64, time: f64, counts: &Counts, cases: &str) -> String {
    let Counts {
        tests,
        failures,
        errors,
        skipped,
    } = counts;
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        r#"<testsuites name="mqdrain" tests="{tests}" failures="{failures}" errors="{errors}" skipped="{skipped}" time="{time:.3}">"#
    );
    let _ = writeln!(
        out,
        r#"  <testsuite name="{}" tests="{tests}" failures="{failures}" errors="{errors}" skipped="{skipped}" time="{time:.3}" timestamp="{}">"#,
        escape(suite),
        super::report::utc(started_at).trim_end_matches('Z')
    );
    out.push_str(cases);
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_control_characters() {
        assert_eq!(escape("a<b & \"c\"\u{1}"), "a&lt;b &amp; &quot;c&quot; ");
    }

    #[test]
    fn an_early_error_is_one_error_case() {
        let xml = render_error("my run", "bad <journal>", 2, 0.0);
        assert!(
            xml.contains(r#"tests="1" failures="0" errors="1" skipped="0""#),
            "{xml}"
        );
        assert!(
            xml.contains(r#"<error message="bad &lt;journal&gt;" type="exit 2">"#),
            "{xml}"
        );
    }
}
