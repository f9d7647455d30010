//! `mqdrain playbook check|run` end to end: exact error positions, every shipped playbook valid,
//! a full drain against the real RabbitMQ, dry run, resume, on_failure, gates, cancellation,
//! JUnit and the report.

mod common;

use common::*;
use lapin::options::QueueDeleteOptions;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A scratch directory for one test's playbooks, journals and reports.
fn scratch(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A playbook that asks for approval, then touches a marker file: the marker says whether the run
/// went past the approval. Returns the scratch directory, the playbook and the marker.
fn approve_then_touch(prefix: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = scratch(prefix);
    let marker = dir.join("ran");
    let path = write(
        &dir,
        "approve.yaml",
        &format!(
            "name: approve\nsteps:\n  - approve: {{message: go?}}\n  - exec: {{command: 'touch {}'}}\n",
            marker.display()
        ),
    );
    (dir, path, marker)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write playbook");
    path
}

fn playbooks_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("playbooks")
}

/// Runs mqdrain with the test brokers' addresses in the environment the playbooks read.
async fn mqdrain_env(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_mqdrain"))
        .args(args)
        .env("MQDRAIN_URL", amqp_url())
        .env("MQDRAIN_MANAGEMENT_URL", management_url())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("the mqdrain binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn queue_names(prefix: &str) -> Vec<String> {
    let queues: Value = reqwest::Client::new()
        .get(format!("{}/api/queues/%2f?columns=name", management_url()))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("management API")
        .json()
        .await
        .expect("queue list");
    let mut names: Vec<String> = queues
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|queue| queue["name"].as_str())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

/// Ready messages right now (AMQP passive declare: not lagging like the management API).
async fn ready(queue: &str) -> u32 {
    let connection = amqp_connection("test ready").await;
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("queue exists");
    let _ = connection.close(200, "bye".into()).await;
    declared.message_count()
}

async fn seed(queue: &str, count: usize) {
    let connection = amqp_connection("test seed").await;
    let channel = connection.create_channel().await.expect("channel");
    declare_queue(&channel, queue, &[]).await;
    assert_eq!(publish(&channel, queue, count).await, count);
    let _ = connection.close(200, "bye".into()).await;
}

async fn delete_queues(prefix: &str) {
    let connection = amqp_connection("test cleanup").await;
    if let Ok(channel) = connection.create_channel().await {
        for name in queue_names(prefix).await {
            let _ = channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let _ = connection.close(200, "bye".into()).await;
}

/// One testcase of a JUnit file: `result` is `passed`, `failure`, `error` or `skipped`.
#[derive(Debug)]
struct Case {
    name: String,
    result: String,
    kind: String,
    message: String,
}

/// The JUnit file's testcases, read by a real XML parser (which also proves it well-formed).
fn junit_cases(xml: &str) -> Vec<Case> {
    let document = roxmltree::Document::parse(xml).unwrap_or_else(|error| panic!("{error}\n{xml}"));
    document
        .descendants()
        .filter(|node| node.has_tag_name("testcase"))
        .map(|case| {
            let verdict = case.children().find(|child| {
                ["failure", "error", "skipped"]
                    .iter()
                    .any(|verdict| child.has_tag_name(*verdict))
            });
            Case {
                name: case.attribute("name").unwrap_or_default().to_string(),
                result: verdict
                    .map_or("passed", |node| node.tag_name().name())
                    .to_string(),
                kind: verdict
                    .and_then(|node| node.attribute("type"))
                    .unwrap_or_default()
                    .to_string(),
                message: verdict
                    .and_then(|node| node.attribute("message"))
                    .unwrap_or_default()
                    .to_string(),
            }
        })
        .collect()
}

/// How many data points the report chart's series `name` has (parsed as XML).
fn chart_points(svg: &str, name: &str) -> usize {
    let document = roxmltree::Document::parse(svg).unwrap_or_else(|error| panic!("{error}\n{svg}"));
    document
        .descendants()
        .find(|node| node.has_tag_name("polyline") && node.attribute("data-name") == Some(name))
        .and_then(|line| line.attribute("points"))
        .map_or(0, |points| points.split_whitespace().count())
}

/// Waits until the management statistics report `count` messages on `queue`: a gate or report
/// that must see the real depth should not start on the stale 0 of a queue just declared.
async fn statistics_show(queue: &str, count: u64) {
    eventually(
        Duration::from_secs(30),
        "the statistics catch up",
        || async {
            let messages = queue_info(queue).await.map(|info| info["messages"].clone());
            match messages {
                Some(Value::Number(n)) if n.as_u64() == Some(count) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

#[tokio::test]
async fn check_reports_every_error_kind_at_its_line_and_column() {
    let dir = scratch("pb-check");
    let path = write(
        &dir,
        "bad.yaml",
        "\
name: bad
vars:
  queue: orders
steps:
  - inspect:
      name: ${vars.queue}
      sampel: 5s
  - expand:
      name: ${vars.queu}
      factor: many
  - exapnd:
      name: orders
  - restore:
      wait: 1m
  - wait:
      name: orders
      until: source.size == 0
",
    );
    let file = path.display().to_string();
    let output = mqdrain(&["playbook", "check", &file]).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let text = stderr(&output);
    let expect = [
        // unknown option
        (7, 7, "unknown option `sampel` for `inspect`"),
        (7, 7, "did you mean `sample`"),
        // undefined variable: the column of the `${`
        (9, 13, "undefined variable `${vars.queu}`"),
        // wrong type
        (10, 15, "wrong value for `expand` option `factor`"),
        (10, 15, "expected a whole number"),
        // unknown step
        (11, 5, "unknown step key `exapnd` (did you mean `expand`?)"),
        // missing required field
        (13, 5, "missing required option `name` for `restore`"),
        // a semantic error in a value
        (17, 14, "invalid condition 'source.size == 0'"),
    ];
    for (line, column, message) in expect {
        let wanted = format!("{file}:{line}:{column}: ");
        assert!(
            text.lines()
                .any(|l| l.starts_with(&wanted) && l.contains(message)),
            "expected `{wanted}...{message}` in:\n{text}"
        );
    }
    // YAML syntax errors carry serde_yaml's own position.
    let broken = write(
        &dir,
        "broken.yaml",
        "name: x\nsteps:\n  - inspect: {name: q\n",
    );
    let output = mqdrain(&["playbook", "check", &broken.display().to_string()]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains(&format!("{}:4:1: not valid YAML", broken.display())),
        "{}",
        stderr(&output)
    );
    // Every bad option of a step is reported, columns count characters (`✓` is 3 bytes), and a
    // missing top-level key points at the mapping it belongs in, past the leading comments.
    let unicode = write(
        &dir,
        "unicode.yaml",
        "name: ünïcode\nsteps:\n  - exec: {command: 'echo ✓ ${vars.nope}', colour: x, timeout: soon}\n",
    );
    let file = unicode.display().to_string();
    let output = mqdrain(&["playbook", "check", &file]).await;
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(text.contains("invalid playbook (3 problems)"), "{text}");
    for (line, column, message) in [
        (3, 29, "undefined variable `${vars.nope}`"),
        (3, 44, "unknown option `colour` for `exec`"),
        (
            3,
            64,
            "wrong value for `exec` option `timeout`: 'soon' is not a duration",
        ),
    ] {
        let wanted = format!("{file}:{line}:{column}: ");
        assert!(
            text.lines()
                .any(|l| l.starts_with(&wanted) && l.contains(message)),
            "expected `{wanted}...{message}` in:\n{text}"
        );
    }
    let headless = write(
        &dir,
        "headless.yaml",
        "# a playbook\n# without name or steps\n\ndescription: oops\nvars: {}\n",
    );
    let file = headless.display().to_string();
    let output = mqdrain(&["playbook", "check", &file]).await;
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    for field in ["name", "steps"] {
        let wanted = format!(
            "{file}:4:1: missing required field `{field}` in the playbook's top-level mapping"
        );
        assert!(
            text.lines().any(|l| l.starts_with(&wanted)),
            "expected `{wanted}` in:\n{text}"
        );
    }

    // --var of an undeclared variable is refused too.
    let output = mqdrain(&[
        "playbook",
        "check",
        &playbooks_dir()
            .join("rabbitmq-drain.yaml")
            .display()
            .to_string(),
        "--var",
        "queeu=x",
    ])
    .await;
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("declares no variable `queeu`"));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn every_shipped_playbook_passes_check() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(playbooks_dir()).expect("playbooks/") {
        let path = entry.expect("entry").path();
        // Every file, whatever its extension: a playbook that is not checked is not shipped.
        let output = mqdrain(&["playbook", "check", &path.display().to_string()]).await;
        assert!(
            output.status.success(),
            "{}: {}",
            path.display(),
            stderr(&output)
        );
        names.push(
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    }
    names.sort();
    assert_eq!(
        names,
        [
            "demo-rabbitmq.yaml",
            "kafka-drain.yaml",
            "rabbitmq-dlq-replay.yaml",
            "rabbitmq-drain.yaml"
        ],
        "the shipped playbooks (add a new one here and to README's list)"
    );
}

#[tokio::test]
async fn rabbitmq_drain_playbook_runs_end_to_end() {
    let queue = unique("pb-e2e");
    let dir = scratch("pb-e2e");
    seed(&queue, 3000).await;
    statistics_show(&queue, 3000).await;
    let playbook = playbooks_dir().join("rabbitmq-drain.yaml");
    let (state, junit, report) = (
        dir.join("state.json"),
        dir.join("junit.xml"),
        dir.join("report.md"),
    );
    let log = dir.join("commands.log").display().to_string();
    let scale_up = format!(
        "echo scale-up >> {log}; for i in 0 1; do $MQDRAIN load consume {queue}.drain.$i --until-empty --idle 3s >/dev/null 2>&1 & done"
    );
    let args = [
        "playbook".to_string(),
        "run".into(),
        playbook.display().to_string(),
        "--yes".into(),
        "--output".into(),
        "json".into(),
        "--var".into(),
        format!("queue={queue}"),
        "--var".into(),
        "factor=2".into(),
        "--var".into(),
        format!("stop_command=echo stop >> {log}"),
        "--var".into(),
        format!("scale_up_command={scale_up}"),
        "--var".into(),
        format!("restart_command=echo restart >> {log}"),
        "--var".into(),
        format!("scale_down_command=echo scale-down >> {log}"),
        "--var".into(),
        "drain_timeout=3m".into(),
        "--state".into(),
        state.display().to_string(),
        "--junit".into(),
        junit.display().to_string(),
        "--report".into(),
        report.display().to_string(),
        "--sample-every".into(),
        "1s".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = mqdrain_env(&args).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let outcome = stdout_json(&output);
    assert_eq!(outcome["status"], "succeeded");
    let steps = outcome["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 13);
    assert!(
        steps.iter().all(|step| step["outcome"] == "ok"),
        "{outcome:#}"
    );
    assert_eq!(
        std::fs::read_to_string(&log).expect("command log"),
        "stop\nscale-up\nrestart\nscale-down\n",
        "the operator's commands ran once each, in order"
    );
    let forward = &steps[4];
    assert_eq!(forward["operation"], "forward");
    assert_eq!(forward["forwarded"]["forwarded"], 3000, "{forward:#}");
    // The backlog went through the temporary queues, which restore removed.
    assert_eq!(ready(&queue).await, 0);
    assert!(queue_names(&format!("{queue}.drain.")).await.is_empty());

    let xml = std::fs::read_to_string(&junit).expect("junit written");
    let cases = junit_cases(&xml);
    assert_eq!(cases.len(), 13, "{xml}");
    assert!(
        cases.iter().all(|case| case.result == "passed"),
        "{cases:#?}"
    );
    assert_eq!(cases[4].name, "05 forward (forward)", "{cases:#?}");

    let markdown = std::fs::read_to_string(&report).expect("report written");
    assert!(markdown.contains("## Timeline"), "{markdown}");
    assert!(markdown.contains("| 5 | forward | forward |"), "{markdown}");
    assert!(markdown.contains("| 5 forward | 3000 |"), "{markdown}");
    assert!(markdown.contains("<svg"), "{markdown}");
    assert!(
        markdown.contains(&format!("data-name=\"{queue}\"")),
        "{markdown}"
    );
    assert!(markdown.contains(&format!("data-name=\"{queue}.drain.0\"")));
    assert!(
        markdown.contains(&format!("| `{queue}` (source) | 3000 | 3000 | 0 |")),
        "the source's depth before the drain, at its peak and after: {markdown}"
    );
    let svg = std::fs::read_to_string(dir.join("report.svg")).expect("svg written");
    assert!(chart_points(&svg, &queue) >= 3, "{svg}");
    assert!(
        chart_points(&svg, &format!("{queue}.drain.0")) >= 2,
        "{svg}"
    );
    assert!(markdown.contains("](report.svg)"));

    let journal: Value =
        serde_json::from_str(&std::fs::read_to_string(&state).expect("journal")).expect("json");
    assert_eq!(journal["status"], "succeeded");
    delete_queues(&queue).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// The demo the README's main command runs (scripts/demo), with a small backlog: it seeds, stops
/// the simulated application, drains through the temporary queues and cleans up.
#[tokio::test]
async fn the_demo_playbook_drains_its_backlog_end_to_end() {
    let queue = unique("pb-demo");
    let dir = scratch("pb-demo");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mqdrain"))
        .args([
            "playbook",
            "run",
            &playbooks_dir()
                .join("demo-rabbitmq.yaml")
                .display()
                .to_string(),
            "--yes",
            "--output",
            "json",
            "--state",
            &dir.join("state.json").display().to_string(),
            "--var",
            &format!("queue={queue}"),
            "--var",
            "backlog=2000",
            "--var",
            &format!("pidfile={}", dir.join("app.pid").display()),
        ])
        .env("MQDRAIN_DEMO_URL", amqp_url())
        .env("MQDRAIN_DEMO_MANAGEMENT_URL", management_url())
        .env_remove("MQDRAIN_URL")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("the mqdrain binary runs");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let outcome = stdout_json(&output);
    assert_eq!(outcome["status"], "succeeded");
    assert!(
        outcome["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .all(|step| step["outcome"] == "ok"),
        "{outcome:#}"
    );
    let forwarded = outcome["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|step| step["name"] == "forward"))
        .and_then(|step| step["forwarded"]["forwarded"].as_u64())
        .expect("the forward's count");
    assert!(
        forwarded > 0 && forwarded <= 2000,
        "the backlog went through the temporary queues: {forwarded}"
    );
    assert_eq!(ready(&queue).await, 0, "the queue is drained");
    assert!(
        queue_names(&format!("{queue}.drain.")).await.is_empty(),
        "the temporary queues are gone"
    );
    delete_queues(&queue).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn dry_run_changes_nothing() {
    let queue = unique("pb-dry");
    let dir = scratch("pb-dry");
    seed(&queue, 50).await;
    let state = dir.join("state.json");
    let junit = dir.join("junit.xml");
    let output = mqdrain_env(&[
        "playbook",
        "run",
        &playbooks_dir()
            .join("rabbitmq-drain.yaml")
            .display()
            .to_string(),
        "--dry-run",
        "--var",
        &format!("queue={queue}"),
        "--state",
        &state.display().to_string(),
        "--junit",
        &junit.display().to_string(),
    ])
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("dry run: nothing was changed"), "{text}");
    assert!(
        text.contains(&format!("would declare durable queue '{queue}.drain.3'")),
        "{text}"
    );
    assert!(text.contains("would ask for approval"), "{text}");
    assert!(text.contains("would run `echo"), "{text}");
    assert!(text.contains("settings: factor=4"), "{text}");
    // The forward cannot be planned before expand created its queues: expected, so the JUnit
    // file (of a run that exits 0) shows it skipped with the reason, not failed.
    let cases = junit_cases(&std::fs::read_to_string(&junit).expect("junit written"));
    assert_eq!(cases.len(), 13, "{cases:#?}");
    assert!(
        cases.iter().all(|case| case.result != "failure"),
        "{cases:#?}"
    );
    let forward = cases
        .iter()
        .find(|case| case.name == "05 forward (forward)")
        .expect("the forward's case");
    assert_eq!(forward.result, "skipped", "{forward:#?}");
    assert!(
        forward
            .message
            .contains("an earlier expand step creates it"),
        "{forward:#?}"
    );
    // On the broker: no temporary queue, the backlog untouched; and no journal was written.
    assert!(queue_names(&format!("{queue}.")).await.is_empty());
    assert_eq!(ready(&queue).await, 50);
    assert!(!state.exists());
    delete_queues(&queue).await;
    let _ = std::fs::remove_dir_all(dir);
}

const RESUMABLE: &str = "\
name: resumable
vars:
  queue: q
  marker: /tmp/marker
  second_command: 'false'
steps:
  - name: mark
    exec:
      command: echo ran >> ${vars.marker}
  - name: expand
    expand:
      name: ${vars.queue}
      factor: 2
  - name: second command
    exec:
      command: ${vars.second_command}
  - name: forward
    forward:
      name: ${vars.queue}
      factor: 2
      idle_timeout: 2s
on_failure:
  - name: note the failure
    exec:
      command: echo failed >> ${vars.marker}.on_failure
";

#[tokio::test]
async fn a_failed_run_resumes_without_repeating_finished_mutating_steps() {
    let queue = unique("pb-resume");
    let dir = scratch("pb-resume");
    seed(&queue, 200).await;
    let path = write(&dir, "resumable.yaml", RESUMABLE);
    let marker = dir.join("marker");
    let state = dir.join("state.json");
    let base = |extra: &[&str]| {
        let mut args = vec![
            "playbook".to_string(),
            "run".into(),
            path.display().to_string(),
            "--output".into(),
            "json".into(),
            "--state".into(),
            state.display().to_string(),
            "--var".into(),
            format!("queue={queue}"),
            "--var".into(),
            format!("marker={}", marker.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    // Run 1: the third step fails after expand; on_failure runs.
    let args = base(&[]);
    let output = mqdrain_env(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let outcome = stdout_json(&output);
    assert_eq!(outcome["steps"][2]["outcome"], "failed");
    assert_eq!(outcome["steps"][3]["outcome"], "not_run");
    assert_eq!(outcome["on_failure"][0]["outcome"], "ok");
    assert_eq!(
        std::fs::read_to_string(format!("{}.on_failure", marker.display())).unwrap(),
        "failed\n"
    );
    assert_eq!(
        queue_names(&format!("{queue}.drain.")).await.len(),
        2,
        "expand ran"
    );
    assert_eq!(ready(&queue).await, 200, "nothing was forwarded yet");

    // Starting over on top of an unfinished journal is refused.
    let output = mqdrain_env(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--resume"), "{}", stderr(&output));

    // Changing a finished step (here its marker file) makes the journal a lie: refused.
    let mut changed = base(&["--resume", "--var", "second_command=true"]);
    changed[10] = format!("marker={}.moved", marker.display());
    let output = mqdrain_env(&changed.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(
            "cannot resume: step 1 exec 'mark' finished in the earlier run with other settings"
        ),
        "{}",
        stderr(&output)
    );

    // Run 2: fixed through --var (the failed step may change) and resumed.
    let args = base(&["--resume", "--var", "second_command=true"]);
    let output = mqdrain_env(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let outcome = stdout_json(&output);
    let steps = outcome["steps"].as_array().unwrap();
    assert_eq!(
        steps[0]["outcome"], "skipped",
        "finished exec is not repeated"
    );
    assert_eq!(steps[1]["outcome"], "ok", "expand re-verifies");
    assert!(
        steps[1]["actions"][0]
            .as_str()
            .unwrap()
            .contains("nothing to do"),
        "{:#}",
        steps[1]
    );
    assert_eq!(steps[2]["outcome"], "ok");
    assert_eq!(steps[3]["forwarded"]["forwarded"], 200);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "ran\n");
    assert_eq!(ready(&queue).await, 0);

    // Run 3: the run succeeded, so resuming it does nothing at all (not even expand).
    seed(&queue, 10).await;
    delete_queues(&format!("{queue}.drain.")).await;
    let args = base(&["--resume", "--var", "second_command=true"]);
    let output = mqdrain_env(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("nothing to resume: the run recorded in"),
        "{}",
        stderr(&output)
    );
    let outcome = stdout_json(&output);
    assert!(
        outcome["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|step| step["outcome"] == "skipped"),
        "{outcome:#}"
    );
    assert_eq!(ready(&queue).await, 10);
    assert!(queue_names(&format!("{queue}.drain.")).await.is_empty());
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "ran\n");
    delete_queues(&queue).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Consumes `queue` like an application would, recording every message id, until `stop` is set
/// and the queue is empty. `attached` is set once the consumer is registered.
fn recording_consumer(
    queue: String,
    ids: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    attached: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use futures_util::StreamExt;
        use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
        let connection = amqp_connection(&format!("test app {queue}")).await;
        let channel = connection.create_channel().await.expect("channel");
        channel
            .basic_qos(200, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                format!("test-app-{queue}").as_str().into(),
                BasicConsumeOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("consume");
        attached.store(true, Ordering::SeqCst);
        loop {
            match tokio::time::timeout(Duration::from_millis(300), consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    ids.lock().unwrap().push(message_id(&delivery));
                    channel
                        .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                        .await
                        .expect("ack");
                }
                Ok(other) => panic!("consumer of {queue} ended: {other:?}"),
                Err(_) if stop.load(Ordering::SeqCst) && ready(&queue).await == 0 => break,
                Err(_) => {}
            }
        }
        let _ = channel.close(200, "scaled down".into()).await;
        let _ = connection.close(200, "bye".into()).await;
    })
}

/// The outcome of step `index` in a run journal, once the journal has it.
fn journal_outcome(state: &Path, index: usize) -> Option<String> {
    let journal: Value = serde_json::from_str(&std::fs::read_to_string(state).ok()?).ok()?;
    journal["steps"]
        .as_array()?
        .iter()
        .find(|entry| entry["index"] == index)
        .and_then(|entry| entry["outcome"].as_str())
        .map(str::to_string)
}

/// Starts `mqdrain playbook run` with its output in files (a pipe nobody reads would block it).
fn spawn_playbook(args: &[String], dir: &Path, run: &str) -> tokio::process::Child {
    let file = |suffix: &str| {
        std::fs::File::create(dir.join(format!("{run}.{suffix}"))).expect("output file")
    };
    tokio::process::Command::new(env!("CARGO_BIN_EXE_mqdrain"))
        .args(args)
        .env("MQDRAIN_URL", amqp_url())
        .env("MQDRAIN_MANAGEMENT_URL", management_url())
        .stdin(std::process::Stdio::null())
        .stdout(file("stdout"))
        .stderr(file("stderr"))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mqdrain")
}

/// SIGKILLs `child` once step `index` of its run finished (the next step is then running).
async fn kill_after_step(child: &mut tokio::process::Child, state: &Path, index: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while journal_outcome(state, index).as_deref() != Some("ok") {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the playbook ended before step {} finished: {status}",
                index + 1
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "step {} did not finish",
            index + 1
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.start_kill().expect("SIGKILL");
    let status = child.wait().await.expect("killed");
    assert_eq!(status.code(), None, "killed by a signal");
}

/// The shipped playbooks/rabbitmq-drain.yaml, SIGKILLed twice — while the background forward
/// runs and the source gate waits, then while the temporary queues drain after the application
/// was restarted — and resumed each time: it completes, every message reaches a consumer, and
/// each of the operator's commands ran exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_drain_resumes_to_the_end_without_losing_messages() {
    const SEEDED: usize = 20_000;
    let queue = unique("pb-kill");
    let dir = scratch("pb-kill");
    seed(&queue, SEEDED).await;
    let state = dir.join("state.json");
    let log = dir.join("commands.log").display().to_string();
    let marker = |name: &str| dir.join(name);
    let command = |word: &str| format!("echo {word} >> {log} && touch {}", marker(word).display());
    let mut args: Vec<String> = [
        "playbook",
        "run",
        &playbooks_dir()
            .join("rabbitmq-drain.yaml")
            .display()
            .to_string(),
        "--yes",
        "--output",
        "json",
        "--state",
        &state.display().to_string(),
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    for var in [
        format!("queue={queue}"),
        "factor=2".to_string(),
        format!("stop_command={}", command("stop")),
        format!("scale_up_command={}", command("scale-up")),
        format!("restart_command={}", command("restart")),
        format!("scale_down_command={}", command("scale-down")),
        "drain_timeout=3m".to_string(),
    ] {
        args.push("--var".into());
        args.push(var);
    }
    let steps: Value = serde_json::from_str(&String::from_utf8_lossy(
        &mqdrain(&["playbook", "check", "--output", "json", &args[2]])
            .await
            .stdout,
    ))
    .expect("check output");
    let index_of = |name: &str| {
        steps["playbook"]["steps"]
            .as_array()
            .and_then(|steps| steps.iter().position(|step| step["name"] == name))
            .unwrap_or_else(|| panic!("no step '{name}'"))
    };

    // The scaled-up consumers and, after the restart, the application: the test's own clients,
    // which outlive the killed runs like a real deployment would.
    let consumed = Arc::new(Mutex::new(Vec::new()));
    let scaled_down = Arc::new(AtomicBool::new(false));
    let app_stop = Arc::new(AtomicBool::new(false));
    let app_attached = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (queue, consumed, scaled_down) = (queue.clone(), consumed.clone(), scaled_down.clone());
        let (app_stop, app_attached) = (app_stop.clone(), app_attached.clone());
        let (scaled_up, restarted, scaled_down_file) =
            (marker("scale-up"), marker("restart"), marker("scale-down"));
        tokio::spawn(async move {
            let mut consumers = Vec::new();
            let mut app = None;
            loop {
                if consumers.is_empty() && scaled_up.exists() {
                    for index in 0..2 {
                        consumers.push(recording_consumer(
                            format!("{queue}.drain.{index}"),
                            consumed.clone(),
                            scaled_down.clone(),
                            Arc::new(AtomicBool::new(false)),
                        ));
                    }
                }
                if app.is_none() && restarted.exists() {
                    app = Some(recording_consumer(
                        queue.clone(),
                        consumed.clone(),
                        app_stop.clone(),
                        app_attached.clone(),
                    ));
                }
                if scaled_down_file.exists() {
                    scaled_down.store(true, Ordering::SeqCst);
                }
                if app.is_some() && scaled_down_file.exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for consumer in consumers {
                consumer.await.expect("temporary consumer");
            }
            app
        })
    };

    // Run 1: killed while the forward runs in the background and the source gate waits.
    let mut run = spawn_playbook(&args, &dir, "run1");
    kill_after_step(&mut run, &state, index_of("scale up temporary consumers")).await;

    // Run 2: resumed; killed while the temporary queues drain, the application back on the
    // source queue.
    args.push("--resume".into());
    let mut run = spawn_playbook(&args, &dir, "run2");
    kill_after_step(&mut run, &state, index_of("restart original consumers")).await;
    eventually(
        Duration::from_secs(30),
        "the application consumes",
        || async {
            if app_attached.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("not attached yet".to_string())
            }
        },
    )
    .await;

    // Run 3: resumed to the end, although the source has a consumer again.
    let output = spawn_playbook(&args, &dir, "run3")
        .wait()
        .await
        .expect("run 3");
    let run3 = |suffix: &str| std::fs::read_to_string(dir.join(format!("run3.{suffix}"))).unwrap();
    assert_eq!(output.code(), Some(0), "{}", run3("stderr"));
    let outcome: Value = serde_json::from_str(&run3("stdout")).expect("run 3 outcome");
    let outcome_of = |name: &str| outcome["steps"][index_of(name)]["outcome"].clone();
    assert_eq!(outcome_of("stop consumers"), "skipped", "{outcome:#}");
    assert_eq!(outcome_of("forward"), "skipped", "{outcome:#}");
    assert_eq!(outcome_of("restore"), "ok", "{outcome:#}");
    let run2 = std::fs::read_to_string(dir.join("run2.stderr")).unwrap();
    assert!(
        run2.contains("re-verifying that the temporary topology"),
        "run 2 re-verified what the restarted forward needs: {run2}"
    );

    let app = watcher
        .await
        .expect("consumers")
        .expect("the application ran");
    app_stop.store(true, Ordering::SeqCst);
    app.await.expect("application");
    assert_eq!(
        std::fs::read_to_string(&log).expect("command log"),
        "stop\nscale-up\nrestart\nscale-down\n",
        "each of the operator's commands ran exactly once"
    );
    assert!(queue_names(&format!("{queue}.drain.")).await.is_empty());
    let consumed = consumed.lock().unwrap().clone();
    let distinct: std::collections::HashSet<&String> = consumed.iter().collect();
    let left = ready(&queue).await as usize;
    assert_eq!(left + distinct.len(), SEEDED, "nothing lost");
    assert_eq!(left, 0, "the source was drained");
    for index in 0..SEEDED {
        assert!(
            distinct.contains(&format!("m-{index}")),
            "m-{index} was consumed"
        );
    }
    // A kill between the temporary queue's confirm and the source's ack duplicates at most the
    // forwarder's unacknowledged window (its prefetch).
    assert!(
        consumed.len() - distinct.len() <= 2000,
        "{} duplicates",
        consumed.len() - distinct.len()
    );
    delete_queues(&queue).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_gate_that_times_out_exits_5_and_is_a_junit_failure() {
    let queue = unique("pb-gate");
    let dir = scratch("pb-gate");
    seed(&queue, 5).await;
    let path = write(
        &dir,
        "gate.yaml",
        "\
name: gate
vars:
  queue: q
steps:
  - name: never empty
    wait:
      name: ${vars.queue}
      until: source.depth == 0
      interval: 500ms
      timeout: 3s
  - name: after
    exec:
      command: 'true'
",
    );
    let junit = dir.join("junit.xml");
    let output = mqdrain_env(&[
        "playbook",
        "run",
        &path.display().to_string(),
        "--var",
        &format!("queue={queue}"),
        "--state",
        &dir.join("state.json").display().to_string(),
        "--junit",
        &junit.display().to_string(),
    ])
    .await;
    assert_eq!(output.status.code(), Some(5), "{}", stderr(&output));
    assert!(
        stderr(&output)
            .contains("timed out (gate timeout): gate `source.depth == 0` did not hold within 3s"),
        "{}",
        stderr(&output)
    );
    let xml = std::fs::read_to_string(&junit).expect("junit");
    let cases = junit_cases(&xml);
    assert_eq!(cases.len(), 2, "{xml}");
    assert_eq!(
        (cases[0].result.as_str(), cases[0].kind.as_str()),
        ("failure", "timeout"),
        "{cases:#?}"
    );
    assert!(
        cases[0].message.starts_with("timed out (gate timeout): "),
        "{cases:#?}"
    );
    assert_eq!(cases[1].result, "skipped", "{cases:#?}");
    assert!(cases[1].message.starts_with("not run"), "{cases:#?}");
    delete_queues(&queue).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Each way a run ends has its own exit code, from real runs: invalid playbook 2, a failed step
/// 1, every kind of bounded wait 5 (the summary and the JUnit failure say which); the gate's 5
/// and cancellation's 130 have their own tests below.
#[tokio::test]
async fn exit_codes_of_a_run_are_distinct_and_timeouts_say_which() {
    let dir = scratch("pb-exit");
    let run = |name: &str, text: &str| {
        let path = write(&dir, &format!("{name}.yaml"), text);
        let junit = dir.join(format!("{name}.xml"));
        let state = dir.join(format!("{name}.state.json"));
        async move {
            let output = mqdrain_env(&[
                "playbook",
                "run",
                &path.display().to_string(),
                "--output",
                "json",
                "--state",
                &state.display().to_string(),
                "--junit",
                &junit.display().to_string(),
            ])
            .await;
            let xml = std::fs::read_to_string(&junit).unwrap_or_default();
            (output, xml)
        }
    };

    let (output, _) = run("invalid", "name: t\nsteps:\n  - exapnd: {name: q}\n").await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("invalid playbook"),
        "{}",
        stderr(&output)
    );

    let (output, xml) = run(
        "failed",
        "name: t\nsteps:\n  - name: fails\n    exec: {command: 'exit 3'}\n",
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(xml.contains("type=\"failure\""), "{xml}");

    for (name, step, which) in [
        (
            "step-timeout",
            "  - name: slow\n    timeout: 1s\n    exec: {command: 'sleep 10'}\n",
            "step timeout",
        ),
        (
            "exec-timeout",
            "  - name: slow\n    exec: {command: 'sleep 10', timeout: 1s}\n",
            "exec timeout",
        ),
    ] {
        let (output, xml) = run(name, &format!("name: t\nsteps:\n{step}")).await;
        assert_eq!(output.status.code(), Some(5), "{name}: {}", stderr(&output));
        let outcome = stdout_json(&output);
        assert_eq!(outcome["steps"][0]["outcome"], "timed_out", "{outcome:#}");
        assert_eq!(outcome["steps"][0]["timed_out"], which, "{outcome:#}");
        assert!(
            outcome["error"]
                .as_str()
                .unwrap_or_default()
                .contains(&format!("timed out ({which})")),
            "{outcome:#}"
        );
        assert!(
            xml.contains(&format!("message=\"timed out ({which}): ")),
            "{name}: {xml}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A run that stops before its first step (invalid playbook, approvals without a terminal, an
/// unfinished journal), or whose journal cannot be written at the end, still leaves the JUnit
/// file and the report it was asked for, saying why.
#[tokio::test]
async fn early_errors_still_write_junit_and_report() {
    let dir = scratch("pb-early");
    let run = |name: &str, text: &str, state: &Path| {
        let path = write(&dir, &format!("{name}.yaml"), text);
        let (junit, report) = (
            dir.join(format!("{name}.xml")),
            dir.join(format!("{name}.md")),
        );
        let state = state.display().to_string();
        async move {
            let output = mqdrain_env(&[
                "playbook",
                "run",
                &path.display().to_string(),
                "--state",
                &state,
                "--junit",
                &junit.display().to_string(),
                "--report",
                &report.display().to_string(),
            ])
            .await;
            let xml = std::fs::read_to_string(&junit)
                .unwrap_or_else(|_| panic!("no JUnit file: {}", stderr(&output)));
            let markdown = std::fs::read_to_string(&report)
                .unwrap_or_else(|_| panic!("no report: {}", stderr(&output)));
            (output, junit_cases(&xml), markdown)
        }
    };
    let state = dir.join("state.json");

    let (output, cases, markdown) =
        run("invalid", "name: t\nsteps:\n  - exapnd: {}\n", &state).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_eq!(cases.len(), 1, "{cases:#?}");
    assert_eq!(
        (cases[0].result.as_str(), cases[0].kind.as_str()),
        ("error", "exit 2"),
        "{cases:#?}"
    );
    assert!(cases[0].message.contains("invalid playbook"), "{cases:#?}");
    assert!(markdown.contains("not started (exit 2)"), "{markdown}");

    let approve = "name: t\nsteps:\n  - approve: {message: go?}\n";
    let (output, cases, markdown) = run("approve", approve, &state).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_eq!(cases[0].result, "error", "{cases:#?}");
    assert!(cases[0].message.contains("--yes"), "{cases:#?}");
    assert!(markdown.contains("No step ran"), "{markdown}");

    let failing = "name: t\nsteps:\n  - exec: {command: 'false'}\n";
    let (output, _, _) = run("failing", failing, &state).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let (output, cases, _) = run("failing", failing, &state).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        cases[0].message.contains("pass --resume to continue it"),
        "{cases:#?}"
    );

    // The journal's temporary file becomes a directory under the run: the final save fails.
    let broken = dir.join("broken.json");
    let (output, cases, markdown) = run(
        "journal",
        &format!(
            "name: t\nsteps:\n  - name: block the journal\n    exec: {{command: 'mkdir {}.tmp'}}\n",
            broken.display()
        ),
        &broken,
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert_eq!(cases.len(), 2, "{cases:#?}");
    assert_eq!(cases[0].result, "passed", "{cases:#?}");
    assert_eq!(cases[1].result, "error", "{cases:#?}");
    assert!(
        cases[1].message.contains("cannot write the run journal"),
        "{cases:#?}"
    );
    assert!(
        markdown.contains("| 1 | block the journal | exec |"),
        "{markdown}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn approvals_need_a_terminal_or_yes() {
    let (dir, path, marker) = approve_then_touch("pb-approve");
    let state = dir.join("state.json").display().to_string();
    let file = path.display().to_string();
    let output = mqdrain_env(&["playbook", "run", &file, "--state", &state]).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("--yes"), "{}", stderr(&output));
    assert!(!marker.exists(), "nothing ran");
    let output = mqdrain_env(&["playbook", "run", &file, "--state", &state, "--yes"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(marker.exists());
    let _ = std::fs::remove_dir_all(dir);
}

/// Step options against the real broker, in one run: exec's env and expect_exit, a step that
/// fails with continue_on_error, a threshold gate that holds above zero, a background forward
/// stopped by a `stop-forward` without a name; and each step's progress as structured
/// `--output json` events.
#[tokio::test]
async fn step_options_work_and_each_step_is_a_structured_event() {
    let queue = unique("pb-opts");
    let dir = scratch("pb-opts");
    seed(&queue, 500).await;
    statistics_show(&queue, 500).await;
    let marker = dir.join("greeting");
    let path = write(
        &dir,
        "options.yaml",
        "\
name: options
vars:
  queue: q
  marker: /tmp/greeting
steps:
  - name: env and expected exit
    exec:
      command: 'echo \"$GREETING\" > ${vars.marker}; exit 3'
      env: {GREETING: hello}
      expect_exit: 3
  - name: may fail
    continue_on_error: true
    exec: {command: 'true', expect_exit: 4}
  - name: below a threshold
    wait:
      name: ${vars.queue}
      until: source.depth < 1000
      interval: 500ms
      settle: 0s
      timeout: 1m
  - name: expand
    expand: {name: '${vars.queue}', factor: 2}
  - name: forward
    forward: {name: '${vars.queue}', factor: 2, background: true}
  - name: source empty
    wait: {name: '${vars.queue}', until: source.depth == 0, interval: 500ms, timeout: 1m}
  - stop-forward:
",
    );
    let output = mqdrain_env(&[
        "playbook",
        "run",
        &path.display().to_string(),
        "--output",
        "json",
        "--state",
        &dir.join("state.json").display().to_string(),
        "--var",
        &format!("queue={queue}"),
        "--var",
        &format!("marker={}", marker.display()),
    ])
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let outcome = stdout_json(&output);
    let steps = outcome["steps"].as_array().expect("steps");
    let outcomes: Vec<&str> = steps
        .iter()
        .map(|step| step["outcome"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        outcomes,
        ["ok", "failed_continued", "ok", "ok", "ok", "ok", "ok"],
        "{outcome:#}"
    );
    assert_eq!(
        std::fs::read_to_string(&marker).expect("the command ran"),
        "hello\n",
        "exec's env reached the command, and exit 3 was the expected one"
    );
    assert!(
        steps[1]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("exited with code 0 (expected 4)"),
        "{:#}",
        steps[1]
    );
    assert_eq!(
        steps[2]["result"]["source"]["depth"], 500,
        "the threshold held with the backlog still there: {:#}",
        steps[2]
    );
    assert_eq!(steps[4]["forwarded"]["forwarded"], 500, "{:#}", steps[4]);
    assert_eq!(
        steps[6]["actions"][0], "stopped background forward 'forward'",
        "{:#}",
        steps[6]
    );
    assert_eq!(ready(&queue).await, 0);

    // Progress: a started and a finished event per step, in order, with its outcome and time.
    let events: Vec<Value> = stderr(&output)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| {
            matches!(
                event["event"].as_str(),
                Some("playbook_step_started" | "playbook_step_finished")
            )
        })
        .collect();
    assert_eq!(events.len(), 14, "{events:#?}");
    for (number, pair) in events.chunks(2).enumerate() {
        let (started, finished) = (&pair[0], &pair[1]);
        assert_eq!(started["event"], "playbook_step_started", "{pair:#?}");
        assert_eq!(finished["event"], "playbook_step_finished", "{pair:#?}");
        for event in pair {
            assert_eq!(event["index"], number + 1, "{pair:#?}");
            assert_eq!(event["total"], 7);
            assert_eq!(event["list"], "steps");
            assert_eq!(event["name"], steps[number]["name"], "{pair:#?}");
            assert_eq!(event["operation"], steps[number]["operation"]);
        }
        assert_eq!(finished["outcome"], outcomes[number], "{pair:#?}");
        assert!(finished["duration_secs"].as_f64().is_some(), "{pair:#?}");
    }
    delete_queues(&queue).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// An approval answered at a terminal (a pty from util-linux `script`): "n" stops the run before
/// the next step, "y" lets it go on.
#[tokio::test]
async fn an_approval_answered_no_stops_the_run() {
    let (dir, path, marker) = approve_then_touch("pb-answer");
    let answer = |reply: &'static str, state: &str| {
        let command = format!(
            "{} playbook run {} --state {}",
            env!("CARGO_BIN_EXE_mqdrain"),
            path.display(),
            dir.join(state).display()
        );
        async move {
            let mut child = tokio::process::Command::new("script")
                .args(["-qec", &command, "/dev/null"])
                .env("MQDRAIN_URL", amqp_url())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("util-linux script runs");
            use tokio::io::AsyncWriteExt;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(reply.as_bytes()).await.expect("answer");
            drop(stdin);
            child.wait_with_output().await.expect("output")
        }
    };
    let output = answer("n\n", "no.json").await;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("approve: go? [y/N]"), "asked: {text}");
    assert!(text.contains("not approved: go?"), "{text}");
    assert!(!marker.exists(), "the step after the approval did not run");
    let output = answer("y\n", "yes.json").await;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(marker.exists(), "approved: the next step ran");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn sigint_cancels_with_130_and_runs_on_failure() {
    let dir = scratch("pb-cancel");
    let marker = dir.join("cleaned");
    let path = write(
        &dir,
        "cancel.yaml",
        &format!(
            "name: cancel\nsteps:\n  - exec: {{command: 'sleep 30'}}\non_failure:\n  - exec: {{command: 'touch {}'}}\n",
            marker.display()
        ),
    );
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mqdrain"))
        .args([
            "playbook",
            "run",
            &path.display().to_string(),
            "--state",
            &dir.join("state.json").display().to_string(),
        ])
        .env("MQDRAIN_URL", amqp_url())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id().expect("pid");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = tokio::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .await
        .expect("kill");
    assert!(status.success());
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("exits soon after SIGINT")
        .expect("output");
    assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    assert!(marker.exists(), "on_failure ran: {}", stderr(&output));
    let journal: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).expect("journal"))
            .expect("json");
    assert_eq!(journal["status"], "cancelled");
    let _ = std::fs::remove_dir_all(dir);
}

/// Kafka helpers of this file: the group's committed offsets, a topic's end offsets, whether a
/// topic exists, and the scaled-up consumers of the temporary topic.
mod kafka_side {
    use super::common::kafka_bootstrap;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    fn config(group: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", kafka_bootstrap())
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("log_level", "3");
        config
    }

    pub fn ends(topic: &str, partitions: i32) -> Vec<Option<i64>> {
        let consumer: BaseConsumer = config("test-observer").create().expect("observer");
        (0..partitions)
            .map(|partition| {
                let (_, high) = consumer
                    .fetch_watermarks(topic, partition, Duration::from_secs(10))
                    .expect("watermarks");
                Some(high)
            })
            .collect()
    }

    pub fn committed(group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
        let consumer: BaseConsumer = config(group).create().expect("consumer");
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions {
            list.add_partition(topic, partition);
        }
        let offsets = consumer
            .committed_offsets(list, Duration::from_secs(10))
            .expect("committed offsets");
        (0..partitions)
            .map(
                |partition| match offsets.find_partition(topic, partition).map(|e| e.offset()) {
                    Some(Offset::Offset(offset)) => Some(offset),
                    _ => None,
                },
            )
            .collect()
    }

    pub fn topic_exists(topic: &str) -> bool {
        let consumer: BaseConsumer = config("test-observer").create().expect("observer");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
    }

    /// Reads `topic` under `group` until `expected` messages arrived, commits and leaves the
    /// group; returns how often each payload was seen.
    pub async fn consume_and_commit(
        topic: &str,
        group: &str,
        expected: usize,
    ) -> HashMap<String, usize> {
        let consumer: StreamConsumer = config(group)
            .set("auto.offset.reset", "earliest")
            .set("client.id", "test-temp-consumer")
            .create()
            .expect("consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut count = 0;
        let deadline = Instant::now() + Duration::from_secs(90);
        while count < expected {
            assert!(
                Instant::now() < deadline,
                "read only {count} of {expected} messages from {topic}"
            );
            match tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await {
                Ok(Ok(message)) => {
                    let payload = String::from_utf8_lossy(message.payload().unwrap_or_default());
                    *seen.entry(payload.into_owned()).or_default() += 1;
                    count += 1;
                }
                Ok(Err(error)) => panic!("temporary consumer: {error}"),
                Err(_) => {}
            }
        }
        consumer
            .commit_consumer_state(CommitMode::Sync)
            .expect("commit");
        tokio::task::spawn_blocking(move || drop(consumer))
            .await
            .expect("consumer leaves the group");
        seen
    }
}

/// The shipped playbooks/kafka-drain.yaml end to end, only its vars overridden: the operator's
/// commands append to a log (the scale-up one also tells the test to start the temporary
/// consumers), the test's consumer drains the temporary topic under the temporary group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_kafka_drain_playbook_drains_end_to_end() {
    let topic = unique("pb-kafka");
    let group = format!("{topic}-group");
    let temp_group = format!("{topic}-temp");
    let temp = format!("{topic}.drain");
    let dir = scratch("pb-kafka");
    kafka::create_topic(&topic, 2, &[]).await;
    kafka::produce(&topic, 0, 300).await;
    kafka::produce(&topic, 1, 200).await;
    kafka::commit(&group, &topic, &[0, 0]);
    let log = dir.join("commands.log");
    let scaled_up = dir.join("scaled-up");
    let vars = [
        format!("topic={topic}"),
        format!("group={group}"),
        format!("temp_group={temp_group}"),
        "factor=2".to_string(),
        format!("stop_command=echo stop >> {}", log.display()),
        format!(
            "scale_up_command=echo scale-up >> {} && touch {}",
            log.display(),
            scaled_up.display()
        ),
        format!("restart_command=echo restart >> {}", log.display()),
        format!("scale_down_command=echo scale-down >> {}", log.display()),
        "drain_timeout=2m".to_string(),
    ];
    let mut args = vec![
        "playbook".to_string(),
        "run".into(),
        playbooks_dir()
            .join("kafka-drain.yaml")
            .display()
            .to_string(),
        "--yes".into(),
        "--output".into(),
        "json".into(),
        "--state".into(),
        dir.join("state.json").display().to_string(),
        "--junit".into(),
        dir.join("junit.xml").display().to_string(),
        "--report".into(),
        dir.join("report.md").display().to_string(),
        "--sample-every".into(),
        "1s".into(),
    ];
    for var in &vars {
        args.push("--var".into());
        args.push(var.clone());
    }
    let mut playbook = tokio::spawn(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_mqdrain"))
            .args(&args)
            .env("MQDRAIN_KAFKA_URL", kafka_url())
            .env_remove("MQDRAIN_URL")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    );
    // The scaled-up consumers start when the playbook's scale-up command says so.
    let seen = loop {
        if scaled_up.exists() {
            break Some(kafka_side::consume_and_commit(&temp, &temp_group, 500).await);
        }
        if playbook.is_finished() {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let output = tokio::time::timeout(Duration::from_secs(180), &mut playbook)
        .await
        .expect("the playbook finishes")
        .expect("playbook task")
        .expect("runs");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let outcome = stdout_json(&output);
    let step = |name: &str| {
        outcome["steps"]
            .as_array()
            .and_then(|steps| steps.iter().find(|step| step["name"] == name))
            .unwrap_or_else(|| panic!("no step '{name}' in {outcome:#}"))
    };
    assert_eq!(
        step("forward")["forwarded"]["forwarded"],
        500,
        "{outcome:#}"
    );
    assert_eq!(step("restore")["outcome"], "ok", "{outcome:#}");
    assert_eq!(
        std::fs::read_to_string(&log).expect("command log"),
        "stop\nscale-up\nrestart\nscale-down\n",
        "the operator's commands ran once each, in order, and on_failure did not run"
    );
    let seen = seen.expect("the scale-up command ran");
    assert_eq!(seen.len(), 500, "every message reached the temporary topic");
    assert!(seen.values().all(|&count| count == 1), "no duplicates");
    assert!(
        !kafka_side::topic_exists(&temp),
        "the temporary topic is gone"
    );
    assert_eq!(
        kafka_side::committed(&group, &topic, 2),
        kafka_side::ends(&topic, 2),
        "the original group resumes at the end of the forwarded backlog"
    );

    // The report measures the groups' lag: the sampler watches the groups the steps name.
    let markdown = std::fs::read_to_string(dir.join("report.md")).expect("report written");
    assert!(
        markdown.contains("| Queue / topic (lag) | Before the drain | Peak | After |"),
        "{markdown}"
    );
    assert!(
        markdown.contains(&format!("| `{topic}` (source) | 500 | 500 | 0 |")),
        "before and after lag of the source: {markdown}"
    );
    assert!(
        markdown.contains("- Inspected: step 1 (inspect): lag 500 at"),
        "{markdown}"
    );
    assert!(markdown.contains("## Lag over time"), "{markdown}");
    let svg = std::fs::read_to_string(dir.join("report.svg")).expect("chart written");
    assert!(
        chart_points(&svg, &topic) >= 3,
        "the source's lag has data points: {svg}"
    );
    assert!(
        chart_points(&svg, &format!("{temp}[0]")) >= 2,
        "the temporary partitions' lag has data points: {svg}"
    );
    let xml = std::fs::read_to_string(dir.join("junit.xml")).expect("junit written");
    let cases = junit_cases(&xml);
    assert_eq!(
        cases.len(),
        outcome["steps"].as_array().map_or(0, Vec::len),
        "one case per step: {xml}"
    );
    assert!(
        cases.iter().all(|case| case.result == "passed"),
        "{cases:#?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
