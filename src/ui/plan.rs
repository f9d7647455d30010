//! Human view of a drain plan: the measured figures, the factor, and the ETA around it.

use crate::ops::inspect::human_secs;
use crate::ops::plan::{Limit, PlanReport};
use std::fmt::Write;

pub fn render(report: &PlanReport) -> String {
    let rates = &report.rates;
    let mut out = format!(
        "plan '{}' ({}): drain within {}\n",
        report.name,
        report.broker,
        human_secs(report.target_secs)
    );
    let _ = writeln!(out, "  backlog          {} messages", rates.backlog);
    let _ = writeln!(out, "  inflow           {:.1} msg/s", rates.inflow);
    let _ = writeln!(
        out,
        "  per consumer     {:.1} msg/s ({})",
        rates.per_consumer, report.per_consumer_source
    );
    if let Some(consumers) = report.consumers_now {
        let _ = writeln!(
            out,
            "  now              {consumers} consumer(s), outflow {}, empty {}",
            report
                .outflow_now
                .map_or_else(|| "unknown".to_string(), |o| format!("{o:.1} msg/s")),
            report.eta_now_secs.map_or_else(
                || "never".to_string(),
                |eta| format!("in {}", human_secs(eta))
            )
        );
    }
    let _ = writeln!(
        out,
        "  forwarder        at most {:.0} msg/s ({})",
        rates.ceiling, report.ceiling_source
    );
    let _ = writeln!(
        out,
        "  needed           {:.1} msg/s (inflow + backlog / target)",
        report.plan.required_rate
    );
    let _ = writeln!(out, "  => {}", crate::ops::plan::summary(report));
    let _ = writeln!(
        out,
        "\n  {:>6}  {:>9}  {:>12}  {:>10}  limited by",
        "factor", "consumers", "outflow/s", "ETA"
    );
    for candidate in &report.plan.candidates {
        let chosen = report.plan.factor == Some(candidate.factor);
        let _ = writeln!(
            out,
            "{} {:>6}  {:>9}  {:>12.1}  {:>10}  {}{}",
            if chosen { "*" } else { " " },
            candidate.factor,
            candidate.consumers,
            candidate.outflow,
            candidate
                .eta_secs
                .map_or_else(|| "never".to_string(), human_secs),
            match candidate.limited_by {
                Limit::Consumers => "consumers",
                Limit::Forwarder => "forwarder",
            },
            if candidate.meets_target {
                ""
            } else {
                " (misses the target)"
            }
        );
    }
    for warning in &report.plan.warnings {
        let _ = writeln!(out, "  warning: {warning}");
    }
    for note in &report.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    out
}
