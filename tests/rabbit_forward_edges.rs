//! The edges of the RabbitMQ drain steps through the mqdrain binary: a target that nacks,
//! --max-messages, a graceful SIGINT, competing forwarders, watch's JSON samples and timeout,
//! --exec on stop-consumers and restore, and settings expand copies from a policy. The test's own
//! lapin and HTTP clients play the producer, the consumers and the operator's policy tooling.

mod common;

use common::*;
use lapin::options::QueueDeleteOptions;
use lapin::types::AMQPValue;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::{Output, Stdio};
use std::time::Duration;

const QUIET: Duration = Duration::from_secs(2);
const STATS_WAIT: Duration = Duration::from_secs(30);

async fn run(args: &[&str]) -> Output {
    let url = amqp_url();
    let mut full = vec!["--url", url.as_str()];
    full.extend_from_slice(args);
    mqdrain(&full).await
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn run_ok(args: &[&str]) -> Output {
    let output = run(args).await;
    assert!(
        output.status.success(),
        "mqdrain {args:?} failed ({:?}): {}\nstdout: {}",
        output.status.code(),
        stderr(&output),
        stdout(&output)
    );
    output
}

/// Declares `queue` and publishes `count` messages with ids `m-0` .. `m-<count-1>`.
async fn seed(queue: &str, arguments: &[(&str, AMQPValue)], count: usize) {
    let connection = amqp_connection("test producer").await;
    let channel = connection.create_channel().await.expect("channel");
    declare_queue(&channel, queue, arguments).await;
    if count > 0 {
        assert_eq!(
            publish(&channel, queue, count).await,
            count,
            "all confirmed"
        );
    }
    let _ = connection.close(200, "seeded".into()).await;
}

async fn delete_queues(names: &[String]) {
    let connection = amqp_connection("test cleanup").await;
    for name in names {
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let _ = connection.close(200, "bye".into()).await;
}

fn temp_names(queue: &str, factor: usize) -> Vec<String> {
    (0..factor)
        .map(|index| format!("{queue}.drain.{index}"))
        .collect()
}

/// Consumes every queue in `queues` until quiet; returns how often each message id was seen and
/// how many messages each queue held.
async fn drain_ids(queues: &[String]) -> (BTreeMap<String, usize>, Vec<usize>) {
    let connection = amqp_connection("test consumer").await;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_queue = Vec::new();
    for queue in queues {
        let deliveries = consume_all(&connection, queue, QUIET).await;
        per_queue.push(deliveries.len());
        for delivery in &deliveries {
            *counts.entry(message_id(delivery)).or_default() += 1;
        }
    }
    let _ = connection.close(200, "bye".into()).await;
    (counts, per_queue)
}

/// Asserts that ids `m-0` .. `m-<total-1>` each occur exactly once.
fn assert_each_once(counts: &BTreeMap<String, usize>, total: usize) {
    let missing: Vec<usize> = (0..total)
        .filter(|index| !counts.contains_key(&format!("m-{index}")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} ids lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let duplicated: Vec<(&String, &usize)> =
        counts.iter().filter(|(_, count)| **count > 1).collect();
    assert!(
        duplicated.is_empty(),
        "{} ids duplicated, e.g. {:?}",
        duplicated.len(),
        &duplicated[..duplicated.len().min(5)]
    );
    assert_eq!(counts.len(), total, "no ids other than the seeded ones");
}

/// Waits until the management API reports `queue` with exactly `messages` messages.
async fn await_depth(queue: &str, messages: u64) {
    eventually(
        STATS_WAIT,
        &format!("{queue} to show {messages}"),
        || async {
            match queue_info(queue).await {
                Some(info) if info["messages"] == messages => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

// -------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_target_that_keeps_nacking_stops_forward_after_max_attempts_without_losing_a_message() {
    let source = unique("nack-src");
    let target = unique("nack-target");
    seed(
        &target,
        &[
            ("x-max-length", AMQPValue::LongInt(5)),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
        ],
        0,
    )
    .await;
    seed(&source, &[], 20).await;

    let output = run(&[
        "forward",
        &source,
        "--to",
        &target,
        "--max-attempts",
        "2",
        "--idle-timeout",
        "3s",
    ])
    .await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(text.contains(&format!("queue '{target}'")), "{text}");
    assert!(text.contains("2 time(s)"), "{text}");
    assert!(text.contains("stays on the source"), "{text}");

    let (counts, per_queue) = drain_ids(&[target.clone(), source.clone()]).await;
    assert_eq!(
        per_queue,
        vec![5, 15],
        "target full at 5, the rest on the source"
    );
    assert_each_once(&counts, 20);
    delete_queues(&[source, target]).await;
}

#[tokio::test]
async fn max_messages_stops_after_that_many_and_leaves_the_rest_on_the_source() {
    let queue = unique("max-msgs");
    seed(&queue, &[], 500).await;
    run_ok(&["expand", &queue, "--factor", "2"]).await;
    let output = run_ok(&[
        "forward",
        &queue,
        "--max-messages",
        "100",
        "--output",
        "json",
    ])
    .await;
    let summary = stdout_json(&output);
    assert_eq!(summary["result"]["forwarded"], 100, "{summary:#}");
    assert_eq!(
        summary["result"]["stopped_by"], "max-messages",
        "{summary:#}"
    );

    let mut queues = temp_names(&queue, 2);
    queues.push(queue.clone());
    let (counts, per_queue) = drain_ids(&queues).await;
    assert_eq!(per_queue[0] + per_queue[1], 100, "{per_queue:?}");
    assert_eq!(per_queue[2], 400, "the source keeps the rest");
    assert_each_once(&counts, 500);
    run_ok(&["restore", &queue, "--wait", "30s"]).await;
    delete_queues(&[queue]).await;
}

#[tokio::test]
async fn sigint_stops_forward_gracefully_and_restore_refuses_while_it_runs() {
    let queue = unique("sigint");
    let total = 3000;
    seed(&queue, &[], total).await;
    run_ok(&["expand", &queue, "--factor", "3"]).await;
    let temps = temp_names(&queue, 3);

    let url = amqp_url();
    let child = mqdrain_command(&[
        "--url",
        &url,
        "forward",
        &queue,
        "--rate-limit",
        "300",
        "--output",
        "json",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true)
    .spawn()
    .expect("forward starts");
    let pid = child.id().expect("pid").to_string();

    // Restore decides from the management API's consumer list, so wait until it names the forwarder.
    eventually(
        STATS_WAIT,
        "the forwarder in the source's consumers",
        || async {
            let info = queue_info(&queue).await;
            match info
                .as_ref()
                .and_then(|info| info["consumer_details"].as_array())
            {
                Some(consumers) if !consumers.is_empty() => Ok(()),
                _ => Err(format!("{info:?}")),
            }
        },
    )
    .await;
    let refused = run(&["restore", &queue]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    let text = stderr(&refused);
    assert!(text.contains("a forwarder still consumes"), "{text}");
    assert!(text.contains(&format!("'{queue}'")), "{text}");
    for temp in &temps {
        assert!(
            queue_info(temp).await.is_some(),
            "{temp} survives the refusal"
        );
    }

    let status = tokio::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .expect("kill runs");
    assert!(status.success());
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("forward exits after SIGINT")
        .expect("output");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let summary = stdout_json(&output);
    assert_eq!(summary["result"]["stopped_by"], "signal", "{summary:#}");
    let forwarded = summary["result"]["forwarded"]
        .as_u64()
        .expect("forwarded count") as usize;

    let mut queues = temps.clone();
    queues.push(queue.clone());
    let (counts, per_queue) = drain_ids(&queues).await;
    assert_each_once(&counts, total);
    assert_eq!(
        per_queue[..3].iter().sum::<usize>(),
        forwarded,
        "the temporary queues hold exactly what forward reported as forwarded"
    );
    assert_eq!(
        per_queue[3],
        total - forwarded,
        "the rest is back on the source"
    );
    run_ok(&["restore", &queue, "--wait", "30s"]).await;
    delete_queues(&[queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_forwarders_share_the_backlog_and_every_message_arrives_once() {
    let queue = unique("compete");
    let total = 20_000;
    seed(&queue, &[], total).await;
    run_ok(&["expand", &queue, "--factor", "4"]).await;
    let args = [
        "forward",
        queue.as_str(),
        "--idle-timeout",
        "3s",
        "--output",
        "json",
    ];
    let (first, second) = tokio::join!(run_ok(&args), run_ok(&args));
    let counted = |output: &Output| {
        let summary = stdout_json(output);
        assert_eq!(summary["result"]["stopped_by"], "idle", "{summary:#}");
        summary["result"]["forwarded"]
            .as_u64()
            .expect("forwarded count") as usize
    };
    let (first, second) = (counted(&first), counted(&second));
    println!("competing forwarders: {first} + {second}");
    assert_eq!(first + second, total, "{first} + {second}");

    let mut queues = temp_names(&queue, 4);
    queues.push(queue.clone());
    let (counts, per_queue) = drain_ids(&queues).await;
    assert_eq!(per_queue[4], 0, "the source is empty");
    assert_each_once(&counts, total);
    run_ok(&["restore", &queue, "--wait", "30s"]).await;
    delete_queues(&[queue]).await;
}

#[tokio::test]
async fn watch_json_prints_a_sample_per_line_and_times_out_with_5() {
    let queue = unique("watch");
    seed(&queue, &[], 30).await;
    run_ok(&["expand", &queue, "--factor", "3"]).await;
    let temps = temp_names(&queue, 3);
    await_depth(&queue, 30).await;
    for temp in &temps {
        await_depth(temp, 0).await;
    }

    let output = run(&[
        "watch",
        &queue,
        "--timeout",
        "2s",
        "--interval",
        "500ms",
        "--output",
        "json",
    ])
    .await;
    assert_eq!(output.status.code(), Some(5), "{}", stderr(&output));
    let text = stdout(&output);
    let lines: Vec<Value> = text
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("not one JSON object per line ({error}): {line}"))
        })
        .collect();
    let (samples, others): (Vec<&Value>, Vec<&Value>) =
        lines.iter().partition(|line| line.get("source").is_some());
    // The first sample at once, the last when the timeout has run out.
    assert!(samples.len() >= 2, "{text}");
    for sample in &samples {
        assert_eq!(sample["source"]["name"], queue.as_str(), "{sample}");
        assert_eq!(sample["source"]["depth"], 30, "{sample}");
        let temporary = sample["temporary"].as_array().expect("temporary array");
        let names: Vec<&str> = temporary
            .iter()
            .map(|backlog| backlog["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names, temps, "one entry per temporary queue: {sample}");
        for backlog in temporary {
            assert_eq!(backlog["depth"], 0, "{sample}");
        }
        assert_eq!(sample["total"], 30, "{sample}");
    }
    // Anything else on stdout can only be the failure document.
    for other in others {
        assert_eq!(other["exit_code"], 5, "{text}");
    }
    run_ok(&["restore", &queue, "--wait", "30s"]).await;
    delete_queues(&[queue]).await;
}

#[tokio::test]
async fn stop_consumers_exec_shows_the_commands_output_and_fails_with_its_exit_code() {
    let queue = unique("stop-exec");
    seed(&queue, &[], 3).await;
    // printf makes the output differ from the command text: only the command's output says this.
    let command = "printf 'scaled-down-%s\\n' marker";

    let human = run_ok(&["stop-consumers", &queue, "--exec", command, "--wait", "20s"]).await;
    let text = stdout(&human);
    assert!(text.contains("scaled-down-marker"), "{text}");
    assert!(text.contains("verified"), "{text}");

    let json = run_ok(&[
        "stop-consumers",
        &queue,
        "--exec",
        command,
        "--wait",
        "20s",
        "--output",
        "json",
    ])
    .await;
    let outcome = stdout_json(&json);
    assert_eq!(outcome["exec"]["exit_code"], 0, "{outcome:#}");
    assert_eq!(
        outcome["exec"]["stdout"], "scaled-down-marker\n",
        "{outcome:#}"
    );
    assert_eq!(outcome["remaining"], serde_json::json!([]), "{outcome:#}");

    let failed = run(&[
        "stop-consumers",
        &queue,
        "--exec",
        "exit 3",
        "--wait",
        "20s",
    ])
    .await;
    assert_ne!(failed.status.code(), Some(0), "{}", stderr(&failed));
    let text = stderr(&failed);
    assert!(text.contains("exit 3"), "{text}");
    assert!(text.contains("code 3"), "{text}");
    delete_queues(&[queue]).await;
}

#[tokio::test]
async fn expand_copies_length_limit_and_dead_lettering_from_a_policy() {
    let queue = unique("policy");
    let policy = format!("{queue}-policy");
    seed(&queue, &[], 0).await;
    put_policy(
        &policy,
        &format!("^{queue}$"),
        serde_json::json!({"max-length": 1000, "dead-letter-exchange": "dlx.policy"}),
    )
    .await;
    eventually(STATS_WAIT, "the policy to apply to the source", || async {
        match queue_info(&queue).await {
            Some(info) if info["policy"] == policy.as_str() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    run_ok(&["expand", &queue, "--factor", "2"]).await;
    for temp in temp_names(&queue, 2) {
        let info = queue_info(&temp).await.expect("temporary queue exists");
        assert_eq!(info["arguments"]["x-max-length"], 1000, "{temp}: {info}");
        assert_eq!(
            info["arguments"]["x-dead-letter-exchange"], "dlx.policy",
            "{temp}: {info}"
        );
        assert_ne!(
            info["policy"],
            policy.as_str(),
            "the policy matches only the source, so the settings come from arguments"
        );
    }
    delete_policy(&policy).await;
    run_ok(&["restore", &queue, "--wait", "30s"]).await;
    delete_queues(&[queue]).await;
}

/// Empty temporary queues for `queue`, with statistics reported (restore waits for them).
async fn expanded_empty(queue: &str, factor: usize) -> Vec<String> {
    seed(queue, &[], 0).await;
    run_ok(&["expand", queue, "--factor", &factor.to_string()]).await;
    let temps = temp_names(queue, factor);
    for temp in &temps {
        await_depth(temp, 0).await;
    }
    temps
}

/// printf makes the output differ from the command text: only the command's output says
/// `restarted-marker`.
const RESTART_COMMAND: &str = "printf 'restarted-%s\\n' marker";

#[tokio::test]
async fn restore_exec_runs_the_restart_command_and_a_second_restore_has_nothing_to_do() {
    let queue = unique("restore-exec");
    let temps = expanded_empty(&queue, 2).await;

    let restored = run_ok(&[
        "restore",
        &queue,
        "--exec",
        RESTART_COMMAND,
        "--wait",
        "30s",
        "--output",
        "json",
    ])
    .await;
    let outcome = stdout_json(&restored);
    assert_eq!(outcome["exec"]["exit_code"], 0, "{outcome:#}");
    assert_eq!(
        outcome["exec"]["stdout"], "restarted-marker\n",
        "{outcome:#}"
    );
    assert_eq!(outcome["deleted"], serde_json::json!(temps), "{outcome:#}");
    for temp in &temps {
        assert!(queue_info(temp).await.is_none(), "{temp} is gone");
    }

    let again = run_ok(&["restore", &queue, "--exec", RESTART_COMMAND]).await;
    let text = stdout(&again);
    assert!(text.contains("nothing to restore"), "{text}");
    delete_queues(&[queue]).await;
}

#[tokio::test]
async fn restore_exec_shows_the_commands_output() {
    let queue = unique("restore-exec-out");
    expanded_empty(&queue, 1).await;
    let restored = run_ok(&[
        "restore",
        &queue,
        "--exec",
        RESTART_COMMAND,
        "--wait",
        "30s",
    ])
    .await;
    let text = stdout(&restored);
    assert!(text.contains("restarted-marker"), "{text}");
    delete_queues(&[queue]).await;
}

#[tokio::test]
async fn the_routing_key_is_recorded_only_for_messages_published_through_an_exchange() {
    use lapin::options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
        QueueBindOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, ExchangeKind};

    let queue = unique("origin");
    let exchange = format!("{queue}.events");
    seed(&queue, &[], 0).await;
    let connection = amqp_connection("test producer").await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "orders.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("binding");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for (through, routing_key, id) in [
        (exchange.as_str(), "orders.created.eu", "via-exchange"),
        ("", queue.as_str(), "via-default"),
    ] {
        let confirm = channel
            .basic_publish(
                through.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default()
                    .with_message_id(id.into())
                    .with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
    }
    run_ok(&["expand", &queue, "--factor", "1"]).await;
    run_ok(&["forward", &queue, "--idle-timeout", "2s"]).await;
    let temps = temp_names(&queue, 1);
    let delivered = consume_all(&connection, &temps[0], QUIET).await;
    assert_eq!(delivered.len(), 2);
    let header = |delivery: &lapin::message::Delivery, name: &str| {
        delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|headers| headers.inner().get(name).cloned())
    };
    for delivery in &delivered {
        match message_id(delivery).as_str() {
            "via-exchange" => {
                assert_eq!(
                    header(delivery, "x-mqdrain-original-exchange"),
                    Some(AMQPValue::LongString(exchange.as_str().into()))
                );
                assert_eq!(
                    header(delivery, "x-mqdrain-original-routing-key"),
                    Some(AMQPValue::LongString("orders.created.eu".into()))
                );
            }
            "via-default" => assert!(
                delivery.properties.headers().is_none(),
                "nothing to record, and no headers table added: {:?}",
                delivery.properties.headers()
            ),
            other => panic!("unexpected message {other}"),
        }
    }
    let _ = channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done".into()).await;
    run_ok(&["restore", &queue, "--wait", "30s"]).await;
    delete_queues(&[queue]).await;
}
