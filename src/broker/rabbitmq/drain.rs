//! The drain cycle on RabbitMQ: stop-consumers, expand, forward, watch, restore.
//!
//! Temporary queues are found on the broker by name (`<prefix>.<i>`), never from local state, so
//! any step can run from another machine or after a crash.

use super::amqp::{self, CONNECTION_NAME_PREFIX};
use super::forwarding::{QueueSink, QueueSource, FORWARD_CONSUMER_TAG};
use super::management::{ConnectionInfo, Management, QueueDetail};
use super::settings;
use crate::broker::KeySource;
use crate::endpoint::RabbitTarget;
use crate::error::{Error, Result};
use crate::ops::dedup::{self, Dedup};
use crate::ops::drain::*;
use crate::ops::estimate;
use crate::ops::exec;
use crate::ops::forward_loop::{self, LoopSettings};
use crate::progress::{Event, Level, Progress};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// RabbitMQ's default statistics interval is 5 s: a zero must survive longer than that to count.
const STATS_SETTLE: Duration = Duration::from_millis(5500);
const POLL: Duration = Duration::from_secs(1);
/// Connection-name prefix of a running forwarder, which restore must not find on the source.
const FORWARD_CONNECTION: &str = "mqdrain forward ";

pub fn temp_prefix(name: &str, temp: Option<&str>) -> String {
    temp.map_or_else(|| format!("{name}.drain"), str::to_string)
}

fn management(target: &RabbitTarget) -> Result<Management> {
    Management::new(&target.management, target.ca_file.as_deref())
}

async fn queue_detail(api: &Management, target: &RabbitTarget, queue: &str) -> Result<QueueDetail> {
    api.queue(&target.vhost, queue)
        .await?
        .ok_or_else(|| amqp::queue_not_found(target, queue))
}

/// Existing temporary queues `<prefix>.<i>`, ordered by index.
async fn find_temp_queues(
    api: &Management,
    target: &RabbitTarget,
    prefix: &str,
) -> Result<Vec<(usize, String)>> {
    let wanted = format!("{prefix}.");
    let mut found: Vec<(usize, String)> = api
        .queue_names(&target.vhost)
        .await?
        .into_iter()
        .filter_map(|name| {
            let index = name.strip_prefix(&wanted)?.parse::<usize>().ok()?;
            Some((index, name))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// A queue's consumers in one management snapshot.
struct ConsumerCensus {
    /// Consumers of other applications: what stop-consumers waits for.
    foreign: Vec<ClientRef>,
    /// Consumers known to be mqdrain's own or the broker's shovels. One whose connection the
    /// statistics cannot name (a closing channel, a connection not listed yet) is neither.
    ours: u64,
}

async fn consumer_census(
    api: &Management,
    target: &RabbitTarget,
    queue: &str,
) -> Result<ConsumerCensus> {
    let detail = queue_detail(api, target, queue).await?;
    let connections = api.connections().await?;
    let by_name: HashMap<&str, &ConnectionInfo> =
        connections.iter().map(|c| (c.name.as_str(), c)).collect();
    let mut census = ConsumerCensus {
        foreign: Vec::new(),
        ours: 0,
    };
    for consumer in &detail.consumer_details {
        let Some(broker_name) = consumer.channel_details.connection_name.clone() else {
            continue;
        };
        let client_name = by_name
            .get(broker_name.as_str())
            .and_then(|connection| connection.client_name.clone());
        let ours_or_shovel = client_name.as_deref().is_some_and(|name| {
            name.starts_with(CONNECTION_NAME_PREFIX) || name.starts_with("Shovel ")
        });
        if ours_or_shovel {
            census.ours += 1;
            continue;
        }
        census.foreign.push(ClientRef {
            id: broker_name,
            host: consumer.channel_details.peer_host.clone(),
            who: Some(format!(
                "user {}{}",
                consumer.channel_details.user.as_deref().unwrap_or("?"),
                client_name
                    .map(|name| format!(", client '{name}'"))
                    .unwrap_or_default()
            )),
        });
    }
    Ok(census)
}

pub async fn stop_consumers(
    target: &RabbitTarget,
    spec: &StopConsumersSpec,
    dry_run: bool,
    progress: &Progress,
) -> Result<StopConsumersOutcome> {
    amqp::check_queue_name(&spec.name, "the queue")?;
    progress.emit(Event::StepStarted {
        step: "stop-consumers".into(),
        detail: format!("queue '{}'", spec.name),
    });
    let api = management(target)?;
    let mut actions = Vec::new();
    let consumers = consumer_census(&api, target, &spec.name).await?.foreign;
    let exec_outcome = exec::operator_command(
        spec.exec.as_deref(),
        spec.exec_timeout,
        dry_run,
        progress,
        &mut actions,
    )
    .await?;
    let mut closed: Vec<ClientRef> = Vec::new();
    if spec.close_connections {
        if dry_run {
            for consumer in &consumers {
                actions.push(format!("would close connection {consumer}"));
            }
        } else {
            close_new_connections(&api, &spec.name, &consumers, &mut closed, &mut actions).await?;
        }
    }
    if dry_run {
        actions.push(format!(
            "would wait up to {} for queue '{}' to have no consumers (now {}: {})",
            humantime::format_duration(spec.wait),
            spec.name,
            consumers.len(),
            consumers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ));
        return Ok(StopConsumersOutcome {
            name: spec.name.clone(),
            dry_run,
            exec: exec_outcome,
            actions,
            remaining: consumers,
        });
    }
    let connection = amqp::connect(target, &format!("stop-consumers {}", spec.name)).await?;
    let deadline = Instant::now() + spec.wait;
    let mut zero_since: Option<Instant> = None;
    let waited = loop {
        let ConsumerCensus { foreign, ours } = consumer_census(&api, target, &spec.name).await?;
        // Consumers that show up late in the statistics, or reconnect, are closed as they appear.
        if spec.close_connections {
            close_new_connections(&api, &spec.name, &foreign, &mut closed, &mut actions).await?;
        }
        // queue.declare counts every consumer in real time; the management list lags but names
        // them. A consumer that reconnected shows in the live count before the list, while the
        // list may still hold the closed one: only consumers the list knows as ours are
        // discounted.
        let live = amqp::passive_declare(&connection, target, &spec.name)
            .await?
            .consumers;
        let zero = foreign.is_empty() && live <= ours;
        if zero {
            let since = *zero_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= STATS_SETTLE {
                break Waited::Verified;
            }
        } else {
            zero_since = None;
        }
        if Instant::now() >= deadline {
            // Running out of time is never a pass, not even at a moment that looked empty.
            break match zero_since {
                Some(since) => Waited::Unsettled(since.elapsed()),
                None => Waited::Remaining {
                    unnamed: live.saturating_sub(ours + foreign.len() as u64),
                    named: foreign,
                },
            };
        }
        tokio::time::sleep(POLL).await;
    };
    let _ = connection.close(200, "done".into()).await;
    progress.emit(Event::StepFinished {
        step: "stop-consumers".into(),
    });
    match waited {
        Waited::Verified => {}
        Waited::Unsettled(quiet) => {
            return Err(Error::Broker(format!(
                "queue '{}' had had no consumers for only {:.1}s of the {:.1}s it takes to trust the statistics when --wait {} ran out{}; run stop-consumers again with a longer --wait",
                spec.name,
                quiet.as_secs_f64(),
                STATS_SETTLE.as_secs_f64(),
                humantime::format_duration(spec.wait),
                came_back(&closed)
            )));
        }
        Waited::Remaining { named, unnamed } => {
            let mut listed: Vec<String> = named.iter().map(ToString::to_string).collect();
            if unnamed > 0 {
                listed.push(format!(
                    "{unnamed} not named by the management statistics yet (just connected, or reconnecting)"
                ));
            }
            return Err(Error::Broker(format!(
                "queue '{}' still has {} consumer(s) after {}: {}{}. Stop them (--exec \"<your stop command>\" or --close-connections) and run stop-consumers again; an application that reconnects must be scaled down, not just disconnected",
                spec.name,
                named.len() as u64 + unnamed,
                humantime::format_duration(spec.wait),
                listed.join("; "),
                came_back(&closed)
            )));
        }
    }
    actions.push(format!(
        "verified: queue '{}' has had no consumers for {:.1}s",
        spec.name,
        STATS_SETTLE.as_secs_f64()
    ));
    Ok(StopConsumersOutcome {
        name: spec.name.clone(),
        dry_run,
        exec: exec_outcome,
        actions,
        remaining: Vec::new(),
    })
}

/// The connections stop-consumers closed, for a failure: consumers came back after them.
fn came_back(closed: &[ClientRef]) -> String {
    if closed.is_empty() {
        return String::new();
    }
    format!(
        "; mqdrain closed {} connection(s) meanwhile and consumers came back: {}",
        closed.len(),
        closed
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// How waiting for a queue without consumers ended.
enum Waited {
    /// No consumers, long enough to trust the statistics.
    Verified,
    /// None seen, but not yet for long enough when the wait ran out.
    Unsettled(Duration),
    /// Consumers the statistics name, and how many more the live count shows.
    Remaining { named: Vec<ClientRef>, unnamed: u64 },
}

/// Closes the connections of `consumers` not closed before; each close is recorded in `actions`.
async fn close_new_connections(
    api: &Management,
    queue: &str,
    consumers: &[ClientRef],
    closed: &mut Vec<ClientRef>,
    actions: &mut Vec<String>,
) -> Result<()> {
    for consumer in consumers {
        if closed.iter().any(|done| done.id == consumer.id) {
            continue;
        }
        api.close_connection(
            &consumer.id,
            &format!("mqdrain stop-consumers: draining queue '{queue}'"),
        )
        .await?;
        actions.push(format!("closed connection {consumer}"));
        closed.push(consumer.clone());
    }
    Ok(())
}

/// What a temporary queue is declared with, and what was left out.
struct TemporaryArguments {
    arguments: Map<String, Value>,
    /// Every argument as name and value text, for the report.
    copied: Vec<(String, String)>,
    dropped: Vec<String>,
}

/// Arguments for a temporary queue: the original's arguments with the effective settings
/// (arguments and policies resolved as RabbitMQ does) written in, minus what the queue type
/// rejects or what would endanger the temporary queue.
fn temporary_arguments(detail: &QueueDetail) -> TemporaryArguments {
    let queue_type = detail.queue_type.as_deref().unwrap_or("classic");
    let mut arguments = detail.arguments.clone();
    let effective = settings::resolve(
        &detail.arguments,
        detail.effective_policy_definition.as_ref(),
    );
    let numbers = [
        ("x-message-ttl", &effective.message_ttl_ms),
        ("x-max-length", &effective.max_length),
        ("x-max-length-bytes", &effective.max_length_bytes),
        ("x-delivery-limit", &effective.delivery_limit),
    ];
    for (key, setting) in numbers {
        if let Some(setting) = setting {
            arguments.insert(key.to_string(), Value::from(setting.value));
        }
    }
    let texts = [
        ("x-overflow", &effective.overflow),
        ("x-dead-letter-exchange", &effective.dead_letter_exchange),
        (
            "x-dead-letter-routing-key",
            &effective.dead_letter_routing_key,
        ),
    ];
    for (key, setting) in texts {
        if let Some(setting) = setting {
            arguments.insert(key.to_string(), Value::from(setting.value.clone()));
        }
    }
    let mut dropped = Vec::new();
    if arguments.remove("x-expires").is_some() || effective.expires_ms.is_some() {
        dropped.push(
            "x-expires: a temporary queue must not delete itself while messages wait for consumers"
                .to_string(),
        );
    }
    let rejected: &[&str] = match queue_type {
        "quorum" => &[
            "x-max-priority",
            "x-queue-mode",
            "x-queue-version",
            "x-queue-master-locator",
        ],
        _ => &[
            "x-delivery-limit",
            "x-dead-letter-strategy",
            "x-quorum-initial-group-size",
        ],
    };
    for key in rejected {
        if arguments.remove(*key).is_some() {
            dropped.push(format!("{key}: {queue_type} queues reject it"));
        }
    }
    arguments.insert("x-queue-type".to_string(), Value::from(queue_type));
    let copied = arguments
        .iter()
        .map(|(key, value)| (key.clone(), value_text(value)))
        .collect();
    TemporaryArguments {
        arguments,
        copied,
        dropped,
    }
}

fn value_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn amqp_value(value: &Value) -> AMQPValue {
    match value {
        Value::Bool(flag) => AMQPValue::Boolean(*flag),
        Value::Number(number) => match number.as_i64() {
            Some(integer) => AMQPValue::LongLongInt(integer),
            None => AMQPValue::Double(number.as_f64().unwrap_or_default()),
        },
        Value::String(text) => AMQPValue::LongString(text.as_str().into()),
        other => AMQPValue::LongString(other.to_string().into()),
    }
}

pub async fn expand(
    target: &RabbitTarget,
    spec: &ExpandSpec,
    factor: usize,
    dry_run: bool,
    progress: &Progress,
) -> Result<ExpandOutcome> {
    amqp::check_queue_name(&spec.name, "the queue")?;
    // The longest temporary name; a long queue name leaves little room for the suffix.
    amqp::check_queue_name(
        &format!(
            "{}.{}",
            temp_prefix(&spec.name, spec.temp.as_deref()),
            factor.saturating_sub(1)
        ),
        "the temporary queue (pass a shorter --temp-prefix)",
    )?;
    progress.emit(Event::StepStarted {
        step: "expand".into(),
        detail: format!("queue '{}' x{}", spec.name, factor),
    });
    let api = management(target)?;
    let detail = queue_detail(&api, target, &spec.name).await?;
    if detail.queue_type.as_deref() == Some("stream") {
        return Err(Error::usage(format!(
            "'{}' is a stream: streams are read by offset and keep their messages, so they are not drained with temporary queues",
            spec.name
        )));
    }
    let prefix = temp_prefix(&spec.name, spec.temp.as_deref());
    let existing = find_temp_queues(&api, target, &prefix).await?;
    let names: Vec<String> = (0..factor)
        .map(|index| format!("{prefix}.{index}"))
        .collect();
    let TemporaryArguments {
        arguments,
        copied,
        dropped,
    } = temporary_arguments(&detail);
    let mut actions = Vec::new();
    let existing_names: Vec<&String> = existing.iter().map(|(_, name)| name).collect();
    if !existing.is_empty() && existing.len() != factor && !spec.force {
        return Err(Error::usage(format!(
            "{} temporary queue(s) named '{prefix}.<i>' already exist ({}), not {}: rerun with --factor {} to keep them, or --force to add the missing ones",
            existing.len(),
            existing_names.iter().map(|name| name.as_str()).collect::<Vec<_>>().join(", "),
            factor,
            existing.len()
        )));
    }
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| !existing_names.contains(name))
        .collect();
    let unchanged = missing.is_empty();
    if unchanged {
        actions.push(format!(
            "nothing to do: the {} temporary queues '{prefix}.0'..'{prefix}.{}' already exist",
            factor,
            factor - 1
        ));
    }
    for (_, extra) in existing.iter().filter(|(index, _)| *index >= factor) {
        actions.push(format!(
            "left alone: '{extra}' is beyond --factor {} (restore removes it once empty)",
            factor
        ));
    }
    let durable = detail.durable.unwrap_or(true);
    let mut table = FieldTable::default();
    for (key, value) in &arguments {
        table.insert(key.as_str().into(), amqp_value(value));
    }
    let connection = if dry_run || unchanged {
        None
    } else {
        Some(amqp::connect(target, &format!("expand {}", spec.name)).await?)
    };
    for name in &missing {
        match &connection {
            None => actions.push(format!(
                "would declare {} queue '{name}' ({})",
                if durable { "durable" } else { "transient" },
                detail.queue_type.as_deref().unwrap_or("classic")
            )),
            Some(connection) => {
                let channel = amqp::open_channel(connection, target).await?;
                channel
                    .queue_declare(
                        name.as_str().into(),
                        QueueDeclareOptions {
                            durable,
                            ..QueueDeclareOptions::default()
                        },
                        table.clone(),
                    )
                    .await
                    .map_err(|error| amqp::channel_error(target, name, &error))?;
                let _ = channel.close(200, "done".into()).await;
                actions.push(format!("declared queue '{name}'"));
            }
        }
    }
    if let Some(connection) = connection {
        let _ = connection.close(200, "done".into()).await;
    }
    for note in &dropped {
        progress.emit(Event::Notice {
            level: Level::Warn,
            message: format!("not copied: {note}"),
        });
    }
    progress.emit(Event::StepFinished {
        step: "expand".into(),
    });
    Ok(ExpandOutcome {
        name: spec.name.clone(),
        dry_run,
        temporary: names,
        partitions: None,
        unchanged,
        actions,
        copied_settings: copied,
        dropped_settings: dropped,
    })
}

fn parse_key(key: &str) -> Result<KeySource> {
    match key {
        "routing-key" => Ok(KeySource::RoutingKey),
        "message-id" => Ok(KeySource::MessageId),
        other => match other.strip_prefix("header:") {
            Some(name) if !name.is_empty() => Ok(KeySource::Header(name.to_string())),
            _ => Err(Error::usage(format!(
                "invalid --key '{other}': use routing-key, message-id or header:<name>"
            ))),
        },
    }
}

/// Checks the window against the prefetch: a window the prefetch cannot cover deadlocks.
pub fn validate_window(spec: &ForwardSpec) -> Result<()> {
    if spec.confirm_window == 0 || spec.ack_batch == 0 {
        return Err(Error::usage(
            "--confirm-window and --ack-batch must be at least 1",
        ));
    }
    if spec.confirm_window + spec.ack_batch > usize::from(spec.prefetch) {
        return Err(Error::usage(format!(
            "--confirm-window {} plus --ack-batch {} exceeds --prefetch {}: the forwarder would wait for deliveries the broker holds back until it acks. Raise --prefetch or lower the window",
            spec.confirm_window, spec.ack_batch, spec.prefetch
        )));
    }
    if spec
        .rate_limit
        .is_some_and(|rate| !rate.is_finite() || rate <= 0.0)
    {
        return Err(Error::usage(
            "--rate-limit must be a positive number of messages per second",
        ));
    }
    if spec.max_attempts == 0 {
        return Err(Error::usage("--max-attempts must be at least 1"));
    }
    Ok(())
}

pub async fn forward(
    target: &RabbitTarget,
    spec: &ForwardSpec,
    dry_run: bool,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<ForwardOutcome> {
    validate_window(spec)?;
    amqp::check_queue_name(&spec.name, "the queue")?;
    for name in &spec.to {
        amqp::check_queue_name(name, "the --to queue")?;
    }
    let key = parse_key(&spec.key)?;
    let api = management(target)?;
    let source = queue_detail(&api, target, &spec.name).await?;
    let targets: Vec<String> = if !spec.to.is_empty() {
        spec.to.clone()
    } else {
        let prefix = temp_prefix(&spec.name, spec.temp.as_deref());
        let found = find_temp_queues(&api, target, &prefix).await?;
        let names: Vec<String> = match spec.factor {
            Some(factor) => (0..factor)
                .map(|index| format!("{prefix}.{index}"))
                .collect(),
            None => found.iter().map(|(_, name)| name.clone()).collect(),
        };
        let missing: Vec<&String> = names
            .iter()
            .filter(|name| !found.iter().any(|(_, existing)| existing == *name))
            .collect();
        if names.is_empty() || !missing.is_empty() {
            return Err(Error::NotFound {
                kind: "temporary queue",
                name: if missing.is_empty() {
                    format!("{prefix}.0")
                } else {
                    missing
                        .iter()
                        .map(|n| n.as_str())
                        .collect::<Vec<_>>()
                        .join("', '")
                },
                scope: format!(" in vhost '{}'", target.vhost),
                hint: format!(
                    "run `mqdrain expand {} --factor N` first, or name the targets with --to",
                    spec.name
                ),
            });
        }
        names
    };
    if targets.contains(&spec.name) {
        return Err(Error::usage(format!(
            "queue '{}' cannot be both the source and a target",
            spec.name
        )));
    }
    for name in &targets {
        queue_detail(&api, target, name).await?;
    }
    let mut actions = vec![format!(
        "{} queue '{}' ({} messages now) with prefetch {} and publish into {} by {} (confirm window {}), acking only after each confirm",
        if dry_run { "would consume" } else { "consume" },
        spec.name,
        source.messages.map_or_else(|| "unknown".to_string(), |m| m.to_string()),
        spec.prefetch,
        targets.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", "),
        spec.strategy.name(),
        spec.confirm_window
    )];
    actions.extend(dedup::describe(
        &spec.dedup_settings(),
        "the message-id property",
        &dedup::stamping(),
        dry_run,
    ));
    if dry_run {
        return Ok(ForwardOutcome {
            name: spec.name.clone(),
            dry_run,
            targets,
            actions,
            result: None,
        });
    }
    progress.emit(Event::StepStarted {
        step: "forward".into(),
        detail: format!(
            "queue '{}' into {} temporary queues",
            spec.name,
            targets.len()
        ),
    });
    let dedup = Dedup::open(
        &spec.dedup_settings(),
        &["amqp", &target.vhost, &spec.name],
        progress,
    )
    .await?;
    let connection = amqp::connect(target, &format!("forward {}", spec.name)).await?;
    let queue_source = QueueSource::open(&connection, target, &spec.name, spec.prefetch).await?;
    let sink = QueueSink::open(&connection, target, targets.clone()).await?;
    let sampler = spawn_depth_sampler(api, target.clone(), spec.name.clone(), progress.clone());
    let outcome = forward_loop::run(
        queue_source,
        sink,
        &LoopSettings::from_spec(spec, key, dedup),
        progress,
        cancel,
    )
    .await;
    sampler.abort();
    let _ = connection.close(200, "mqdrain forward done".into()).await;
    progress.emit(Event::StepFinished {
        step: "forward".into(),
    });
    let outcome = outcome?;
    Ok(ForwardOutcome {
        name: spec.name.clone(),
        dry_run,
        targets,
        actions,
        result: Some(outcome),
    })
}

fn spawn_depth_sampler(
    api: Management,
    target: RabbitTarget,
    queue: String,
    progress: Progress,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok(Some(detail)) = api.queue(&target.vhost, &queue).await {
                progress.emit(backlog_event(&detail));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
}

fn backlog_of(detail: &QueueDetail) -> Backlog {
    let stats = detail.message_stats.clone().unwrap_or_default();
    let in_rate = stats.inflow();
    let out_rate = stats.outflow();
    let net = match (in_rate, out_rate) {
        (Some(inflow), Some(outflow)) => Some(outflow - inflow),
        _ => None,
    };
    let (_, eta_secs) = estimate::project(detail.messages, net);
    Backlog {
        name: detail.name.clone(),
        depth: detail.messages,
        in_rate,
        out_rate,
        eta_secs,
    }
}

fn backlog_event(detail: &QueueDetail) -> Event {
    let backlog = backlog_of(detail);
    Event::Backlog {
        name: backlog.name,
        depth: backlog.depth,
        in_rate: backlog.in_rate,
        out_rate: backlog.out_rate,
        eta_secs: backlog.eta_secs,
    }
}

/// Samples the source queue and the temporary queues found by name (re-listed every sample, so
/// queues created or removed meanwhile show up).
struct QueueWatch {
    api: Management,
    target: RabbitTarget,
    queue: String,
    prefix: String,
}

impl WatchSampler for QueueWatch {
    async fn sample(&mut self) -> Result<(Backlog, Vec<Backlog>)> {
        let temp = find_temp_queues(&self.api, &self.target, &self.prefix).await?;
        let source = backlog_of(&queue_detail(&self.api, &self.target, &self.queue).await?);
        let mut temporary = Vec::new();
        for (_, name) in &temp {
            if let Some(detail) = self.api.queue(&self.target.vhost, name).await? {
                temporary.push(backlog_of(&detail));
            }
        }
        Ok((source, temporary))
    }

    fn timeout_message(&self, last: &WatchSample, timeout: Duration) -> String {
        format!(
            "queue '{}' and its temporary queues still hold {} messages after {}; raise --timeout or add consumers",
            self.queue,
            last.total
                .map_or_else(|| "an unknown number of".to_string(), |total| total.to_string()),
            humantime::format_duration(timeout)
        )
    }
}

pub async fn watch(
    target: &RabbitTarget,
    spec: &WatchSpec,
    progress: &Progress,
    cancel: &CancellationToken,
    on_sample: &mut (dyn FnMut(&WatchSample) + Send),
) -> Result<WatchOutcome> {
    amqp::check_queue_name(&spec.name, "the queue")?;
    let api = management(target)?;
    queue_detail(&api, target, &spec.name).await?;
    let prefix = temp_prefix(&spec.name, spec.temp.as_deref());
    progress.emit(Event::StepStarted {
        step: "watch".into(),
        detail: format!(
            "queue '{}' and its temporary queues '{prefix}.<i>'",
            spec.name
        ),
    });
    let sampler = QueueWatch {
        api,
        target: target.clone(),
        queue: spec.name.clone(),
        prefix,
    };
    watch_with(spec, spec.interval, sampler, progress, cancel, on_sample).await
}

/// Why a temporary queue may not be deleted yet, or `None` when it is empty and unused.
async fn blocking_reason(
    api: &Management,
    target: &RabbitTarget,
    connection: &lapin::Connection,
    name: &str,
) -> Result<Option<String>> {
    let Some(detail) = api.queue(&target.vhost, name).await? else {
        return Ok(None);
    };
    let live = match amqp::passive_declare(connection, target, name).await {
        Ok(counts) => counts,
        Err(Error::NotFound { .. }) => return Ok(None),
        Err(error) => return Err(error),
    };
    let ready = detail.messages_ready;
    let unacked = detail.messages_unacknowledged;
    let consumers = detail.consumers.unwrap_or(0).max(live.consumers);
    let mut reasons = Vec::new();
    match (ready, unacked) {
        (Some(0), Some(0)) if live.ready == 0 => {}
        (Some(ready), Some(unacked)) => reasons.push(format!(
            "{} ready and {unacked} unacked",
            ready.max(live.ready)
        )),
        _ => reasons
            .push("its message counts are not known yet (statistics not reported)".to_string()),
    }
    if consumers > 0 {
        reasons.push(format!(
            "{consumers} consumer(s) attached (stop the scaled-up consumers first)"
        ));
    }
    Ok((!reasons.is_empty()).then(|| format!("'{name}': {}", reasons.join(", "))))
}

pub async fn restore(
    target: &RabbitTarget,
    spec: &RestoreSpec,
    dry_run: bool,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<RestoreOutcome> {
    amqp::check_queue_name(&spec.name, "the queue")?;
    let api = management(target)?;
    let prefix = temp_prefix(&spec.name, spec.temp.as_deref());
    let temp: Vec<String> = find_temp_queues(&api, target, &prefix)
        .await?
        .into_iter()
        .map(|(_, name)| name)
        .collect();
    let mut actions = Vec::new();
    if temp.is_empty() {
        actions.push(format!(
            "nothing to restore: no temporary queues '{prefix}.<i>' exist"
        ));
        // The original consumers still need their restart, e.g. on a rerun after a crash.
        let exec = exec::operator_command(
            spec.exec.as_deref(),
            spec.exec_timeout,
            dry_run,
            progress,
            &mut actions,
        )
        .await?;
        return Ok(RestoreOutcome {
            name: spec.name.clone(),
            dry_run,
            exec,
            deleted: Vec::new(),
            actions,
        });
    }
    progress.emit(Event::StepStarted {
        step: "restore".into(),
        detail: format!("queue '{}': {} temporary queues", spec.name, temp.len()),
    });
    let forwarders = forwarders_on(&api, target, &spec.name).await?;
    if !forwarders.is_empty() {
        return Err(Error::Broker(format!(
            "a forwarder still consumes queue '{}' ({}); stop it (Ctrl-C, or stop-forward in a playbook) before restore",
            spec.name,
            forwarders.join(", ")
        )));
    }
    let exec_outcome = exec::operator_command(
        spec.exec.as_deref(),
        spec.exec_timeout,
        dry_run,
        progress,
        &mut actions,
    )
    .await?;
    let connection = amqp::connect(target, &format!("restore {}", spec.name)).await?;
    let deadline = spec.wait.map(|wait| Instant::now() + wait);
    let mut clean_since: Option<Instant> = None;
    let reasons = loop {
        let mut reasons = Vec::new();
        for name in &temp {
            if let Some(reason) = blocking_reason(&api, target, &connection, name).await? {
                reasons.push(reason);
            }
        }
        let details = join_details(&api, target, &temp).await;
        for detail in &details {
            progress.emit(backlog_event(detail));
        }
        if reasons.is_empty() {
            // Checked twice across a statistics interval: a classic queue's if-empty delete
            // would also remove a queue whose messages are all unacked.
            let since = *clean_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= STATS_SETTLE || dry_run {
                break reasons;
            }
        } else {
            clean_since = None;
            if dry_run || deadline.is_none_or(|deadline| Instant::now() >= deadline) {
                break reasons;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = connection.close(200, "cancelled".into()).await;
                return Err(Error::Cancelled);
            }
            _ = tokio::time::sleep(POLL) => {}
        }
    };
    if !reasons.is_empty() {
        let _ = connection.close(200, "refused".into()).await;
        if dry_run {
            actions.push(format!("would refuse to delete: {}", reasons.join("; ")));
            return Ok(RestoreOutcome {
                name: spec.name.clone(),
                dry_run,
                exec: exec_outcome,
                deleted: Vec::new(),
                actions,
            });
        }
        return Err(Error::Broker(format!(
            "restore refused, temporary queues are not empty and unused: {}. Let the scaled consumers finish (or pass --wait 10m), then run restore again",
            reasons.join("; ")
        )));
    }
    let mut deleted = Vec::new();
    for name in &temp {
        if dry_run {
            actions.push(format!("would delete empty queue '{name}'"));
            continue;
        }
        let quorum = api
            .queue(&target.vhost, name)
            .await?
            .and_then(|detail| detail.queue_type)
            .is_some_and(|queue_type| queue_type == "quorum");
        let channel = amqp::open_channel(&connection, target).await?;
        // Quorum queues close the channel on if-empty/if-unused, so they rely on the checks above.
        let options = QueueDeleteOptions {
            if_empty: !quorum,
            if_unused: !quorum,
            ..QueueDeleteOptions::default()
        };
        channel
            .queue_delete(name.as_str().into(), options)
            .await
            .map_err(|error| amqp::channel_error(target, name, &error))?;
        let _ = channel.close(200, "done".into()).await;
        actions.push(format!("deleted empty queue '{name}'"));
        deleted.push(name.clone());
    }
    let _ = connection.close(200, "done".into()).await;
    progress.emit(Event::StepFinished {
        step: "restore".into(),
    });
    Ok(RestoreOutcome {
        name: spec.name.clone(),
        dry_run,
        exec: exec_outcome,
        deleted,
        actions,
    })
}

async fn join_details(
    api: &Management,
    target: &RabbitTarget,
    names: &[String],
) -> Vec<QueueDetail> {
    let mut details = Vec::new();
    for name in names {
        if let Ok(Some(detail)) = api.queue(&target.vhost, name).await {
            details.push(detail);
        }
    }
    details
}

/// Connection names of mqdrain forwarders consuming `queue`.
async fn forwarders_on(
    api: &Management,
    target: &RabbitTarget,
    queue: &str,
) -> Result<Vec<String>> {
    let detail = queue_detail(api, target, queue).await?;
    let connections = api.connections().await?;
    let names: BTreeMap<&str, &str> = connections
        .iter()
        .filter_map(|c| {
            c.client_name
                .as_deref()
                .map(|client| (c.name.as_str(), client))
        })
        .collect();
    Ok(detail
        .consumer_details
        .iter()
        .filter_map(|consumer| {
            let client = consumer
                .channel_details
                .connection_name
                .as_deref()
                .and_then(|broker_name| names.get(broker_name).copied());
            let by_connection = client.is_some_and(|client| client.starts_with(FORWARD_CONNECTION));
            let by_tag = consumer
                .consumer_tag
                .as_deref()
                .is_some_and(|tag| tag.starts_with(FORWARD_CONSUMER_TAG));
            (by_connection || by_tag).then(|| {
                format!(
                    "'{}' from {}",
                    client.unwrap_or(FORWARD_CONSUMER_TAG),
                    consumer.channel_details.peer_host.as_deref().unwrap_or("?")
                )
            })
        })
        .collect())
}
