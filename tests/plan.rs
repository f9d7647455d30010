//! `plan` and `expand --factor auto` on a live RabbitMQ backlog: the test's own consumer acks at
//! about 200 msg/s and its own producer keeps publishing, and the planned factor must follow from
//! the rates mqdrain measured.

mod common;

use common::*;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

async fn run_json(args: &[&str]) -> Value {
    let url = amqp_url();
    let mut full = vec!["--url", url.as_str(), "--output", "json"];
    full.extend_from_slice(args);
    let output = mqdrain(&full).await;
    assert!(
        output.status.success(),
        "mqdrain {args:?} failed ({:?}): {}",
        output.status.code(),
        stderr(&output)
    );
    stdout_json(&output)
}

fn number(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

#[tokio::test]
async fn plan_follows_from_the_measured_rates() {
    let queue = unique("plan");
    let connection = amqp_connection("test app").await;
    let setup = connection.create_channel().await.unwrap();
    declare_queue(&setup, &queue, &[]).await;
    assert_eq!(publish(&setup, &queue, 30_000).await, 30_000);

    let stop = Arc::new(AtomicBool::new(false));
    // The application's one consumer: about 200 msg/s, acking each message.
    let consumer_channel = connection.create_channel().await.unwrap();
    consumer_channel
        .basic_qos(20, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "slow-app".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consuming = tokio::spawn({
        let stop = Arc::clone(&stop);
        let channel = consumer_channel.clone();
        async move {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(Some(Ok(delivery))) =
                    tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let _ = channel
                        .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                        .await;
                }
            }
        }
    });
    // The producer keeps going at about 50 msg/s.
    let producing = tokio::spawn({
        let stop = Arc::clone(&stop);
        let channel = connection.create_channel().await.unwrap();
        let queue = queue.clone();
        async move {
            while !stop.load(Ordering::SeqCst) {
                let _ = channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        b"more",
                        BasicProperties::default(),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    // Rates need a few statistics intervals to show.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let report = run_json(&["plan", &queue, "--target", "60s", "--sample", "5s"]).await;
    let rates = &report["rates"];
    let (backlog, inflow, per_consumer) = (
        number(&rates["backlog"]),
        number(&rates["inflow"]),
        number(&rates["per_consumer"]),
    );
    println!("measured: backlog {backlog}, inflow {inflow:.1}/s, per consumer {per_consumer:.1}/s");
    assert_eq!(report["consumers_now"], 1, "{report:#}");
    assert_eq!(report["per_consumer_source"], "measured");
    assert!((60.0..=260.0).contains(&per_consumer), "{report:#}");
    assert!((20.0..=80.0).contains(&inflow), "{report:#}");
    assert!(backlog > 25_000.0, "{report:#}");
    let plan = &report["plan"];
    assert_eq!(plan["verdict"], "meets");
    // The factor is the smallest whose consumers outpace inflow + backlog / target.
    let needed = inflow + backlog / 60.0;
    let expected = (needed / per_consumer).ceil();
    assert_eq!(number(&plan["factor"]), expected, "{report:#}");
    assert!(
        (2.0..=10.0).contains(&expected),
        "about (50 + 500) / 200: {expected}"
    );
    let chosen = plan["candidates"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["factor"] == plan["factor"]))
        .expect("the chosen factor is listed")
        .clone();
    assert!(number(&chosen["eta_secs"]) <= 60.0, "{chosen}");
    let smaller = plan["candidates"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|c| number(&c["factor"]) == expected - 1.0)
                .cloned()
        })
        .expect("one less is listed");
    assert_eq!(smaller["meets_target"], false, "{smaller}");

    // A forwarder slower than the need: more queues do not help, and plan says so.
    let bound = run_json(&[
        "plan",
        &queue,
        "--target",
        "60s",
        "--sample",
        "2s",
        "--forwarder-rate",
        "300",
        "--per-consumer-rate",
        "200",
    ])
    .await;
    assert_eq!(bound["plan"]["verdict"], "forwarder-bound", "{bound:#}");
    assert_eq!(
        bound["plan"]["factor"], 2,
        "300 msg/s needs two 200 msg/s consumers"
    );
    assert!(bound["plan"]["warnings"][0]
        .as_str()
        .is_some_and(|w| w.contains("bottleneck")));

    // expand --factor auto sizes the temporary queues the same way.
    let expanded = run_json(&[
        "expand", &queue, "--factor", "auto", "--target", "60s", "--sample", "3s",
    ])
    .await;
    let temporary = expanded["temporary"].as_array().map_or(0, Vec::len);
    let first = expanded["actions"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    println!("expand --factor auto: {first}");
    assert!(
        first.starts_with(&format!("factor {temporary} planned")),
        "{expanded:#}"
    );
    assert!(
        (2..=10).contains(&temporary),
        "close to the plan above: {temporary}"
    );

    stop.store(true, Ordering::SeqCst);
    let _ = consuming.await;
    let _ = producing.await;
    let cleanup = connection.create_channel().await.unwrap();
    for name in std::iter::once(queue.clone())
        .chain((0..temporary).map(|index| format!("{queue}.drain.{index}")))
    {
        let _ = cleanup
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "done".into()).await;
}
