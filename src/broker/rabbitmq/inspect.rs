//! Observing one RabbitMQ queue over a sampling window: counts, consumers, settings, rates.

use super::amqp::{self, CONNECTION_NAME_PREFIX};
use super::management::{ConnectionInfo, Management, QueueDetail};
use super::settings;
use crate::endpoint::RabbitTarget;
use crate::error::{Error, Result};
use crate::ops::estimate::{self, Sample};
use crate::ops::inspect::{ConsumerInfo, InspectSpec, QueueRates, QueueReport};
use crate::progress::{Event, Level, Progress};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Management statistics refresh every few seconds; polling faster only repeats values.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

pub async fn observe_queue(
    target: &RabbitTarget,
    spec: &InspectSpec,
    progress: &Progress,
) -> Result<QueueReport> {
    amqp::check_queue_name(&spec.name, "the queue")?;
    progress.emit(Event::StepStarted {
        step: "inspect".into(),
        detail: format!("queue '{}' on {}", spec.name, target.amqp_redacted()),
    });
    let connection = amqp::connect(target, &format!("inspect {}", spec.name)).await?;
    // Proves the queue exists (and the credentials work) before anything else is asked.
    let passive = amqp::passive_declare(&connection, target, &spec.name).await?;
    let mut notes = Vec::new();
    let mut management = match Management::new(&target.management, target.ca_file.as_deref()) {
        Ok(management) => Some(management),
        Err(error) => {
            notes.push(degraded_note(&error));
            None
        }
    };
    let mut first_detail = None;
    if let Some(api) = &management {
        match api.queue(&target.vhost, &spec.name).await {
            Ok(Some(detail)) => first_detail = Some(detail),
            // AMQP just found the queue: the API is another broker's, or behind another path.
            Ok(None) => {
                notes.push(degraded_note(&Error::Broker(format!(
                    "the management API at {} does not know queue '{}' in vhost '{}' although AMQP found it: does --management-url point at the same broker?",
                    api.endpoint(),
                    spec.name,
                    target.vhost
                ))));
                management = None;
            }
            Err(error) => {
                notes.push(degraded_note(&error));
                management = None;
            }
        }
    }

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut inflows = Vec::new();
    let mut outflows = Vec::new();
    let mut detail = first_detail;
    let mut ready_without_api = passive.ready;
    let mut consumers_without_api = passive.consumers;
    loop {
        let elapsed = started.elapsed();
        let depth = match &detail {
            Some(detail) => {
                if let Some(stats) = &detail.message_stats {
                    inflows.extend(stats.inflow());
                    outflows.extend(stats.outflow());
                }
                detail.messages
            }
            None => Some(ready_without_api),
        };
        if let Some(depth) = depth {
            samples.push(Sample {
                at_secs: elapsed.as_secs_f64(),
                depth,
            });
        }
        if elapsed >= spec.sample {
            break;
        }
        progress.emit(Event::Sampling {
            what: format!("rates of '{}'", spec.name),
            elapsed,
            total: spec.sample,
        });
        tokio::time::sleep(SAMPLE_INTERVAL.min(spec.sample - elapsed)).await;
        match &management {
            Some(api) => match api.queue(&target.vhost, &spec.name).await {
                Ok(Some(next)) => detail = Some(next),
                // The report keeps what was seen so far rather than losing the whole run.
                failed => {
                    let why = match failed {
                        Err(error) => error.to_string(),
                        _ => "the queue disappeared from its listing".to_string(),
                    };
                    notes.push(format!(
                        "the management API failed while sampling ({why}); figures and the drain estimate are from the {:.0}s sampled before",
                        started.elapsed().as_secs_f64()
                    ));
                    management = None;
                    break;
                }
            },
            None => {
                let counts = amqp::passive_declare(&connection, target, &spec.name).await?;
                ready_without_api = counts.ready;
                consumers_without_api = counts.consumers;
            }
        }
    }
    let drain = estimate::estimate(&samples, average(&inflows), average(&outflows));

    let connections = match &management {
        Some(api) => match api.connections().await {
            Ok(connections) => Some(connections),
            Err(error) => {
                notes.push(format!(
                    "could not list connections ({error}); consumer connection names are the broker's"
                ));
                None
            }
        },
        None => None,
    };
    let operator_policy = match (&management, &detail) {
        (Some(api), Some(detail)) => {
            operator_policy_definition(api, target, detail, &mut notes).await
        }
        _ => None,
    };
    let _ = connection.close(200, "inspect done".into()).await;

    let report = match detail {
        Some(detail) => from_detail(
            target,
            detail,
            connections.as_deref(),
            operator_policy.as_ref(),
            drain,
            notes,
        ),
        None => QueueReport {
            name: spec.name.clone(),
            vhost: target.vhost.clone(),
            depth: None,
            ready: Some(ready_without_api),
            unacked: None,
            message_bytes: None,
            consumers: Some(consumers_without_api),
            consumer_list: None,
            queue_type: None,
            durable: None,
            policy: None,
            operator_policy: None,
            settings: None,
            rates: QueueRates::default(),
            head_message_age_secs: None,
            drain,
            management_api: false,
            notes,
            warnings: Vec::new(),
        },
    };
    for note in &report.notes {
        progress.emit(Event::Notice {
            level: Level::Warn,
            message: note.clone(),
        });
    }
    progress.emit(Event::StepFinished {
        step: "inspect".into(),
    });
    Ok(report)
}

fn degraded_note(error: &Error) -> String {
    let (why, fix) = match error {
        Error::AccessRefused {
            endpoint, user, ..
        } => (
            format!("the management API at {endpoint} refused the credentials of user '{user}'"),
            "pass --management-url http://USER:PASSWORD@HOST:15672 with a user the API accepts (tag 'monitoring' or 'administrator')",
        ),
        other => (
            format!("management API unavailable ({other})"),
            "fix that, or pass --management-url if the API listens elsewhere",
        ),
    };
    format!(
        "{why}; showing what AMQP alone tells: ready messages and consumer count only — no unacked count, rates, consumer list or policies. To see everything, {fix}"
    )
}

/// The definition of the operator policy that applies to the queue, if any: the API merges it
/// into the effective definition, and only this tells which limits it imposed.
async fn operator_policy_definition(
    api: &Management,
    target: &RabbitTarget,
    detail: &QueueDetail,
    notes: &mut Vec<String>,
) -> Option<Map<String, Value>> {
    let name = detail
        .operator_policy
        .as_deref()
        .filter(|name| !name.is_empty())?;
    match api.operator_policy_definition(&target.vhost, name).await {
        Ok(definition) => definition,
        Err(error) => {
            notes.push(format!(
                "could not read operator policy '{name}' ({error}); the limits it sets show as source 'policy'"
            ));
            None
        }
    }
}

fn from_detail(
    target: &RabbitTarget,
    detail: QueueDetail,
    connections: Option<&[ConnectionInfo]>,
    operator_policy: Option<&Map<String, Value>>,
    drain: estimate::DrainEstimate,
    notes: Vec<String>,
) -> QueueReport {
    let by_name: HashMap<&str, &ConnectionInfo> = connections
        .unwrap_or_default()
        .iter()
        .map(|connection| (connection.name.as_str(), connection))
        .collect();
    let consumer_list = detail
        .consumer_details
        .iter()
        .map(|consumer| {
            let broker_name = consumer.channel_details.connection_name.clone();
            let client_name = broker_name
                .as_deref()
                .and_then(|name| by_name.get(name))
                .and_then(|connection| connection.client_name.clone());
            ConsumerInfo {
                consumer_tag: consumer.consumer_tag.clone(),
                mqdrain: client_name
                    .as_deref()
                    .is_some_and(|name| name.starts_with(CONNECTION_NAME_PREFIX)),
                connection: client_name.or(broker_name),
                peer_host: consumer.channel_details.peer_host.clone(),
                user: consumer.channel_details.user.clone(),
                prefetch: consumer.prefetch_count,
                ack_required: consumer.ack_required,
            }
        })
        .collect();
    let stats = detail.message_stats.clone().unwrap_or_default();
    let rate = |detail: &Option<super::management::RateDetail>| {
        detail.as_ref().and_then(|detail| detail.rate)
    };
    QueueReport {
        name: detail.name.clone(),
        vhost: target.vhost.clone(),
        depth: detail.messages,
        ready: detail.messages_ready,
        unacked: detail.messages_unacknowledged,
        message_bytes: detail.message_bytes,
        consumers: detail.consumers,
        consumer_list: Some(consumer_list),
        queue_type: detail.queue_type.clone(),
        durable: detail.durable,
        policy: detail.policy.clone().filter(|name| !name.is_empty()),
        operator_policy: detail
            .operator_policy
            .clone()
            .filter(|name| !name.is_empty()),
        settings: Some({
            let mut settings = settings::resolve(
                &detail.arguments,
                detail.effective_policy_definition.as_ref(),
            );
            if let Some(definition) = operator_policy {
                settings.attribute_operator_policy(definition);
            }
            settings
        }),
        rates: QueueRates {
            publish: stats.inflow(),
            deliver: rate(&stats.deliver_get_details),
            ack: rate(&stats.ack_details),
            redeliver: rate(&stats.redeliver_details),
        },
        head_message_age_secs: head_age_secs(&detail),
        drain,
        management_api: true,
        notes,
        warnings: Vec::new(),
    }
}

/// The AMQP timestamp property is in seconds, but some publishers write milliseconds.
fn head_age_secs(detail: &QueueDetail) -> Option<f64> {
    let stamp = detail.head_message_timestamp.as_ref()?.as_f64()?;
    let stamp_secs = if stamp > 1e11 { stamp / 1000.0 } else { stamp };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    Some((now - stamp_secs).max(0.0))
}

fn average(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        None
    } else {
        Some(values.iter().sum::<f64>() / values.len() as f64)
    }
}
