//! The human view of an inspect report.

use crate::ops::estimate::{DrainEstimate, DrainState};
use crate::ops::inspect::{human_secs, InspectReport, QueueReport, TopicReport, Warning};
use std::fmt::Write;

pub fn render(report: &InspectReport) -> String {
    match report {
        InspectReport::Rabbit(queue) => render_queue(queue),
        InspectReport::Kafka(topic) => render_topic(topic),
    }
}

fn count(value: Option<u64>) -> String {
    value.map_or_else(|| "unknown".to_string(), |value| value.to_string())
}

fn rate(value: Option<f64>) -> String {
    value.map_or_else(|| "unknown".to_string(), |value| format!("{value:.1}/s"))
}

fn render_queue(report: &QueueReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "RabbitMQ queue '{}' (vhost '{}', {} {})",
        report.name,
        report.vhost,
        match report.durable {
            Some(true) => "durable",
            Some(false) => "transient",
            None => "durability unknown,",
        },
        report
            .queue_type
            .as_deref()
            .unwrap_or("queue of unknown type"),
    );
    let _ = writeln!(
        out,
        "  depth      {}  (ready {}, unacked {})",
        count(report.depth),
        count(report.ready),
        count(report.unacked)
    );
    let _ = writeln!(out, "  consumers  {}", count(report.consumers));
    if let Some(consumers) = &report.consumer_list {
        for consumer in consumers {
            let _ = writeln!(
                out,
                "    - {}  peer {}  user {}  prefetch {}{}",
                consumer.connection.as_deref().unwrap_or("?"),
                consumer.peer_host.as_deref().unwrap_or("?"),
                consumer.user.as_deref().unwrap_or("?"),
                consumer.prefetch.map_or_else(
                    || "?".to_string(),
                    |p| if p == 0 {
                        "unlimited".into()
                    } else {
                        p.to_string()
                    }
                ),
                if consumer.mqdrain { "  (mqdrain)" } else { "" }
            );
        }
    }
    let _ = writeln!(
        out,
        "  rates      publish {}  deliver {}  ack {}",
        rate(report.rates.publish),
        rate(report.rates.deliver),
        rate(report.rates.ack)
    );
    if let Some(settings) = &report.settings {
        let mut shown = Vec::new();
        let mut add = |name: &str, value: Option<String>, source: Option<&str>| {
            if let (Some(value), Some(source)) = (value, source) {
                shown.push(format!("{name}={value} ({source})"));
            }
        };
        add(
            "x-message-ttl",
            settings
                .message_ttl_ms
                .as_ref()
                .map(|s| format!("{}ms", s.value)),
            settings.message_ttl_ms.as_ref().map(|s| s.source),
        );
        add(
            "x-max-length",
            settings.max_length.as_ref().map(|s| s.value.to_string()),
            settings.max_length.as_ref().map(|s| s.source),
        );
        add(
            "x-max-length-bytes",
            settings
                .max_length_bytes
                .as_ref()
                .map(|s| s.value.to_string()),
            settings.max_length_bytes.as_ref().map(|s| s.source),
        );
        add(
            "x-overflow",
            settings.overflow.as_ref().map(|s| s.value.clone()),
            settings.overflow.as_ref().map(|s| s.source),
        );
        add(
            "x-dead-letter-exchange",
            settings
                .dead_letter_exchange
                .as_ref()
                .map(|s| format!("'{}'", s.value)),
            settings.dead_letter_exchange.as_ref().map(|s| s.source),
        );
        add(
            "x-dead-letter-routing-key",
            settings
                .dead_letter_routing_key
                .as_ref()
                .map(|s| format!("'{}'", s.value)),
            settings.dead_letter_routing_key.as_ref().map(|s| s.source),
        );
        add(
            "x-delivery-limit",
            settings
                .delivery_limit
                .as_ref()
                .map(|s| s.value.to_string()),
            settings.delivery_limit.as_ref().map(|s| s.source),
        );
        add(
            "x-expires",
            settings
                .expires_ms
                .as_ref()
                .map(|s| format!("{}ms", s.value)),
            settings.expires_ms.as_ref().map(|s| s.source),
        );
        if shown.is_empty() {
            shown.push("none that limit the backlog".to_string());
        }
        let _ = writeln!(out, "  settings   {}", shown.join(", "));
        let policies: Vec<String> = [
            report.policy.as_ref().map(|p| format!("policy '{p}'")),
            report
                .operator_policy
                .as_ref()
                .map(|p| format!("operator policy '{p}'")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !policies.is_empty() {
            let _ = writeln!(out, "  policies   {}", policies.join(", "));
        }
    }
    render_drain(&mut out, &report.drain, "depth");
    render_tail(&mut out, &report.notes, &report.warnings);
    out
}

fn render_topic(report: &TopicReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Kafka topic '{}'", report.name);
    match &report.group {
        Some(group) => {
            let members = report.members.as_ref().map_or(0, Vec::len);
            let _ = writeln!(
                out,
                "  group      '{group}' state {} with {members} member(s)",
                report.group_state.as_deref().unwrap_or("unknown")
            );
            for member in report.members.iter().flatten() {
                let _ = writeln!(
                    out,
                    "    - {} ({}) on {}",
                    member.client_id.as_deref().unwrap_or("?"),
                    member.member_id,
                    member.host.as_deref().unwrap_or("?")
                );
            }
            let _ = writeln!(out, "  lag        {}", count(report.lag));
        }
        None => {
            let _ = writeln!(out, "  group      none given (--group shows lag)");
        }
    }
    let _ = writeln!(
        out,
        "  {:>9}  {:>12}  {:>12}  {:>12}  {:>10}",
        "partition", "low", "high", "committed", "lag"
    );
    for partition in &report.partitions {
        let _ = writeln!(
            out,
            "  {:>9}  {:>12}  {:>12}  {:>12}  {:>10}",
            partition.partition,
            partition.low,
            partition.high,
            partition
                .committed
                .map_or_else(|| "-".to_string(), |c| c.to_string()),
            partition
                .lag
                .map_or_else(|| "-".to_string(), |l| l.to_string()),
        );
    }
    let settings = &report.settings;
    let _ = writeln!(
        out,
        "  settings   retention.ms={} retention.bytes={} cleanup.policy={}",
        settings
            .retention_ms
            .map_or_else(|| "(broker default)".to_string(), |v| v.to_string()),
        settings
            .retention_bytes
            .map_or_else(|| "(broker default)".to_string(), |v| v.to_string()),
        settings
            .cleanup_policy
            .as_deref()
            .unwrap_or("(broker default)"),
    );
    if let Some(drain) = &report.drain {
        render_drain(&mut out, drain, "lag");
    }
    render_tail(&mut out, &report.notes, &report.warnings);
    out
}

fn render_drain(out: &mut String, drain: &DrainEstimate, what: &str) {
    let verdict = match drain.state {
        DrainState::Empty => "empty".to_string(),
        DrainState::Draining => format!(
            "draining at {:.1} msg/s, empty in about {}",
            drain.net_drain_rate.unwrap_or_default(),
            human_secs(drain.eta_secs.unwrap_or(f64::INFINITY))
        ),
        DrainState::Growing => format!(
            "growing by {:.1} msg/s: it will not drain at this rate",
            -drain.net_drain_rate.unwrap_or_default()
        ),
        DrainState::Stalled => format!("not moving: the {what} did not change"),
        DrainState::Unknown => "unknown (no usable samples)".to_string(),
    };
    let measured = match drain.window_secs {
        Some(window) => format!("measured over {window:.0}s from {}", drain.method),
        None => "no samples".to_string(),
    };
    let _ = writeln!(
        out,
        "  drain      {verdict}  [in {} out {}, {measured}]",
        rate(drain.inflow_rate),
        rate(drain.outflow_rate),
    );
}

fn render_tail(out: &mut String, notes: &[String], warnings: &[Warning]) {
    for note in notes {
        let _ = writeln!(out, "  note: {note}");
    }
    if warnings.is_empty() {
        let _ = writeln!(out, "  no risks found");
    }
    for warning in warnings {
        let _ = writeln!(out, "  WARNING [{}] {}", warning.code, warning.message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::inspect::sample_queue_report;

    fn queue(durable: Option<bool>, queue_type: Option<&str>) -> QueueReport {
        let mut report = sample_queue_report();
        report.durable = durable;
        report.queue_type = queue_type.map(str::to_string);
        report
    }

    #[test]
    fn durability_is_shown_only_when_known() {
        let first_line = |report: QueueReport| {
            render_queue(&report)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(
            first_line(queue(None, None)),
            "RabbitMQ queue 'orders' (vhost '/', durability unknown, queue of unknown type)"
        );
        assert!(first_line(queue(Some(true), Some("quorum"))).ends_with("durable quorum)"));
        assert!(first_line(queue(Some(false), Some("classic"))).ends_with("transient classic)"));
    }
}
