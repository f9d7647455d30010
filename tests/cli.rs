//! Command-line parsing: help for every subcommand, usage errors exit 2.

mod common;

use common::*;

/// The subcommand names listed under "Commands:" in a help text.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        // Wrapped descriptions are indented further than the subcommand names.
        .filter(|line| !line.starts_with("   "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn every_subcommand_has_help() {
    let top = mqdrain(&["--help"]).await;
    assert!(top.status.success());
    let text = String::from_utf8_lossy(&top.stdout).into_owned();
    assert!(text.contains("Exit codes"), "{text}");
    let top_level = subcommands(&text);
    for expected in [
        "inspect",
        "stop-consumers",
        "expand",
        "forward",
        "watch",
        "restore",
        "plan",
        "dlq",
        "playbook",
        "load",
    ] {
        assert!(
            top_level.iter().any(|name| name == expected),
            "{expected} missing from {top_level:?}"
        );
    }
    // Depth first through nested groups (dlq inspect, playbook run, load publish, ...).
    let mut pending: Vec<Vec<String>> = top_level.into_iter().map(|name| vec![name]).collect();
    let mut seen = Vec::new();
    while let Some(path) = pending.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let output = mqdrain(&args).await;
        let shown = path.join(" ");
        assert!(output.status.success(), "{shown} --help");
        let help = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            help.contains(&format!("Usage: mqdrain {shown}")),
            "{shown}: {help}"
        );
        assert!(help.contains("--url"), "{shown}: {help}");
        for child in subcommands(&help) {
            let mut next = path.clone();
            next.push(child);
            pending.push(next);
        }
        seen.push(shown);
    }
    for nested in [
        "dlq inspect",
        "dlq replay",
        "playbook check",
        "playbook run",
        "load publish",
        "load consume",
    ] {
        assert!(
            seen.iter().any(|path| path == nested),
            "{nested} not reached: {seen:?}"
        );
    }
}

#[tokio::test]
async fn bad_url_scheme_exits_2() {
    let output = mqdrain(&["--url", "mqtt://user:Sup3rSecret@h", "inspect", "q"]).await;
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(text.contains("unsupported URL"), "{text}");
    assert!(!text.contains("Sup3rSecret"), "{text}");
}

#[tokio::test]
async fn urls_that_do_not_parse_never_show_the_password() {
    for url in [
        "ops:Sup3rSecret@127.0.0.1:5672",
        "amqp://ops:Sup3r#Secret@127.0.0.1/",
        "amqp://ops:Sup3rSecret@127.0.0.1:99999",
    ] {
        let output = mqdrain(&["--url", url, "inspect", "q"]).await;
        let line = error_line(&output, 2);
        assert!(!stderr(&output).contains("Sup3r"), "{url}: {line}");
        assert!(line.contains("ops:***@127.0.0.1"), "{url}: {line}");
    }
    let output = mqdrain(&[
        "--url",
        "amqp://127.0.0.1/",
        "--management-url",
        "http://admin:Sup3rSecret@127.0.0.1:99999",
        "inspect",
        "q",
    ])
    .await;
    let line = error_line(&output, 2);
    assert!(!stderr(&output).contains("Sup3rSecret"), "{line}");
    assert!(line.contains("invalid management URL"), "{line}");
}

#[tokio::test]
async fn refused_kafka_secret_settings_are_named_but_not_shown() {
    // This build has no libcurl, so librdkafka refuses the OIDC secret — and quotes its value.
    for command in [
        &["inspect", "orders"][..],
        &["dlq", "inspect", "orders.dlq"][..],
    ] {
        let mut args = vec![
            "--url",
            "kafka://127.0.0.1:1",
            "-X",
            "sasl.oauthbearer.client.secret=S3cretValue",
        ];
        args.extend_from_slice(command);
        let output = mqdrain(&args).await;
        let line = error_line(&output, 2);
        assert!(!stderr(&output).contains("S3cretValue"), "{line}");
        assert!(
            line.contains("-X sasl.oauthbearer.client.secret"),
            "{command:?}: {line}"
        );
    }
}

#[tokio::test]
async fn missing_url_and_unknown_flag_exit_2() {
    let output = mqdrain(&["inspect", "q"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--url"), "{}", stderr(&output));
    let output = mqdrain(&["inspect", "q", "--no-such-flag"]).await;
    assert_eq!(output.status.code(), Some(2));
    let output = mqdrain(&["--url", "kafka://h:1", "inspect", "q", "--sample", "soon"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("not a duration"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn json_errors_are_documents_too() {
    let output = mqdrain(&[
        "--url",
        "amqp://guest:guest@127.0.0.1:1/",
        "inspect",
        "q",
        "--output",
        "json",
    ])
    .await;
    assert_eq!(output.status.code(), Some(4));
    let document = stdout_json(&output);
    assert_eq!(document["exit_code"], 4);
    assert!(document["error"].as_str().unwrap().contains("cannot reach"));
}

#[test]
fn mqdrain_under_test_uses_the_test_brokers_management_port() {
    let envs = |args: &[&str]| -> Vec<(String, Option<String>)> {
        mqdrain_command(args)
            .as_std()
            .get_envs()
            .map(|(key, value)| {
                (
                    key.to_string_lossy().into_owned(),
                    value.map(|value| value.to_string_lossy().into_owned()),
                )
            })
            .collect()
    };
    let rabbit = envs(&["--url", &amqp_url(), "inspect", "q"]);
    assert!(
        rabbit.contains(&("MQDRAIN_MANAGEMENT_URL".to_string(), Some(management_url()))),
        "{rabbit:?}"
    );
    let kafka = envs(&["--url", &kafka_url(), "inspect", "t"]);
    assert!(
        kafka.contains(&("MQDRAIN_MANAGEMENT_URL".to_string(), None)),
        "{kafka:?}"
    );
}

#[tokio::test]
async fn queue_names_longer_than_amqp_allows_are_usage_errors() {
    // Port 1: a command that connected before checking the name would exit 4, not 2.
    let url = "amqp://guest:guest@127.0.0.1:1/%2f";
    let long = "q".repeat(300);
    let short = "orders";
    let commands: Vec<Vec<&str>> = vec![
        vec!["inspect", &long],
        vec!["plan", &long, "--target", "30m"],
        vec!["stop-consumers", &long],
        vec!["expand", &long, "--factor", "2"],
        vec!["forward", &long],
        vec!["forward", short, "--to", &long],
        vec!["watch", &long],
        vec!["restore", &long],
        vec!["dlq", "inspect", &long],
        vec!["load", "publish", &long, "--count", "1"],
        vec!["load", "consume", &long],
    ];
    for command in commands {
        let mut args = vec!["--url", url];
        args.extend_from_slice(&command);
        let output = mqdrain(&args).await;
        let line = error_line(&output, 2);
        assert!(
            line.contains("is 300 bytes long") && line.contains("1 to 255 bytes"),
            "{}: {line}",
            command[0]
        );
    }
    // The suffix of the temporary queues counts too.
    let almost = "q".repeat(250);
    let output = mqdrain(&["--url", url, "expand", &almost, "--factor", "12"]).await;
    let line = error_line(&output, 2);
    assert!(line.contains("--temp-prefix"), "{line}");
    let vhost = format!("amqp://127.0.0.1:1/{}", "v".repeat(256));
    let output = mqdrain(&["--url", &vhost, "inspect", "q"]).await;
    let line = error_line(&output, 2);
    assert!(line.contains("vhost in the URL is 256 bytes"), "{line}");
}
