//! Running the operator's own commands (`--exec`, playbook `exec`) with a timeout.

use crate::error::{Error, Result};
use crate::progress::{Event, Level, Progress};
use serde::Serialize;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// How much of a command's output is kept for the report.
const OUTPUT_TAIL: usize = 4000;

#[derive(Debug, Clone, Serialize)]
pub struct ExecOutcome {
    pub command: String,
    /// `None` when the command was killed at its timeout.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub duration_secs: f64,
}

/// Runs `command` with `sh -c`; fails when it times out or exits with another code than `expect`.
pub async fn run(
    command: &str,
    timeout: Duration,
    env: &[(String, String)],
    expect: i32,
) -> Result<ExecOutcome> {
    let started = Instant::now();
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(
            env.iter()
                .map(|(key, value)| (key.as_str(), value.as_str())),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| Error::Broker(format!("cannot start `{command}`: {error}")))?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let read_out = async {
        let mut text = Vec::new();
        if let Some(pipe) = stdout.as_mut() {
            let _ = pipe.read_to_end(&mut text).await;
        }
        text
    };
    let read_err = async {
        let mut text = Vec::new();
        if let Some(pipe) = stderr.as_mut() {
            let _ = pipe.read_to_end(&mut text).await;
        }
        text
    };
    let waited = tokio::time::timeout(timeout, async {
        let (out, err, status) = tokio::join!(read_out, read_err, child.wait());
        (out, err, status)
    })
    .await;
    let (out, err, status) = match waited {
        Ok(done) => done,
        Err(_) => {
            let _ = child.kill().await;
            return Err(Error::Timeout(format!(
                "`{command}` did not finish within {}; it was killed. Raise the timeout or check the command",
                humantime::format_duration(timeout)
            )));
        }
    };
    let status =
        status.map_err(|error| Error::Broker(format!("`{command}` failed to run: {error}")))?;
    let outcome = ExecOutcome {
        command: command.to_string(),
        exit_code: status.code(),
        stdout: tail(&out),
        stderr: tail(&err),
        duration_secs: started.elapsed().as_secs_f64(),
    };
    if outcome.exit_code != Some(expect) {
        return Err(Error::Broker(format!(
            "`{command}` exited with {} (expected {expect}){}",
            outcome
                .exit_code
                .map_or_else(|| "a signal".to_string(), |code| format!("code {code}")),
            if outcome.stderr.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", outcome.stderr.trim())
            }
        )));
    }
    Ok(outcome)
}

/// Runs the operator's own command of a drain step (`--exec`), reporting it as a progress
/// notice and in `actions`; with `dry_run` it only records what would run.
pub async fn operator_command(
    command: Option<&str>,
    timeout: Duration,
    dry_run: bool,
    progress: &Progress,
    actions: &mut Vec<String>,
) -> Result<Option<ExecOutcome>> {
    let Some(command) = command else {
        return Ok(None);
    };
    if dry_run {
        actions.push(format!(
            "would run `{command}` (timeout {})",
            humantime::format_duration(timeout)
        ));
        return Ok(None);
    }
    progress.emit(Event::Notice {
        level: Level::Info,
        message: format!("running `{command}`"),
    });
    let outcome = run(command, timeout, &[], 0).await?;
    actions.push(format!(
        "ran `{command}`: exit code 0 in {:.1}s",
        outcome.duration_secs
    ));
    Ok(Some(outcome))
}

fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let start = text.len().saturating_sub(OUTPUT_TAIL);
    let start = (start..text.len())
        .find(|&index| text.is_char_boundary(index))
        .unwrap_or(text.len());
    text[start..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn captures_output_and_checks_the_exit_code() {
        let outcome = run("echo hello; echo oops >&2", Duration::from_secs(5), &[], 0)
            .await
            .unwrap();
        assert_eq!(outcome.stdout.trim(), "hello");
        assert_eq!(outcome.stderr.trim(), "oops");
        let error = run("exit 3", Duration::from_secs(5), &[], 0)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("code 3"), "{error}");
        assert!(run("exit 3", Duration::from_secs(5), &[], 3).await.is_ok());
    }

    #[tokio::test]
    async fn kills_at_the_timeout() {
        let error = run("sleep 5", Duration::from_millis(200), &[], 0)
            .await
            .unwrap_err();
        assert_eq!(error.exit_code(), crate::error::exit::TIMEOUT);
    }

    #[tokio::test]
    async fn passes_environment() {
        let env = [("MQDRAIN_TEST_VALUE".to_string(), "42".to_string())];
        let outcome = run("echo $MQDRAIN_TEST_VALUE", Duration::from_secs(5), &env, 0)
            .await
            .unwrap();
        assert_eq!(outcome.stdout.trim(), "42");
    }
}
