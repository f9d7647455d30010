//! JUnit XML of a run (`--junit`): one testcase per step, so CI systems show a playbook run
//! like a test suite — failures with their message, skipped and never-reached steps as skipped.

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
    let failures = records
        .iter()
        .filter(|record| record.outcome.is_failure())
        .count();
    let skipped = records
        .iter()
        .filter(|record| {
            matches!(
                record.outcome,
                StepOutcome::Skipped | StepOutcome::NotRun | StepOutcome::PlanDeferred
            )
        })
        .count();
    let time = outcome.finished_at - outcome.started_at;
    let suite = format!("playbook.{}", outcome.name.replace(' ', "_"));
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        r#"<testsuites name="mqdrain" tests="{}" failures="{failures}" errors="0" skipped="{skipped}" time="{time:.3}">"#,
        records.len()
    );
    let _ = writeln!(
        out,
        r#"  <testsuite name="{}" tests="{}" failures="{failures}" errors="0" skipped="{skipped}" time="{time:.3}" timestamp="{}">"#,
        escape(&suite),
        records.len(),
        super::report::utc(outcome.started_at).trim_end_matches('Z')
    );
    for record in records {
        testcase(&mut out, &suite, record);
    }
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
}
