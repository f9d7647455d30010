//! Speed and memory of mqdrain's forwarders, measured against each broker's own baseline in the
//! same run: `scripts/bench [OPTIONS]` (starts the brokers, then `cargo bench --bench drain --
//! OPTIONS`). `scripts/bench --help` lists the options.
//!
//! The machines this runs on are small and shared, so absolute rates mean little: every figure
//! that matters is a ratio against a baseline measured minutes earlier on the same brokers, and
//! nothing here asserts a target. The bench only fails when something did not work (a broker is
//! down, a message went missing, a command failed).
//!
//! RabbitMQ: N persistent 256-byte messages in a durable classic queue. Baseline: the broker's
//! own dynamic shovel (ack-mode on-confirm) moving them into one queue. Measured: `mqdrain
//! forward` moving the same N into the 4 queues `mqdrain expand --factor 4` created; then once
//! more with 2N, to show that its peak RSS does not grow with the backlog.
//!
//! Kafka: M 200-byte records in a 3-partition topic. Baseline: a plain rdkafka consumer reading
//! the whole topic in this process. Measured: `mqdrain forward` into the temporary topic of
//! `mqdrain expand --factor 4` (12 partitions), under a group whose offsets are 0.
//!
//! How the times are taken (the same way for baseline and mqdrain):
//! - transfer: from the first message seen at the destination to the last one, polling every
//!   50 ms (RabbitMQ: passive queue.declare ready counts of the destination queues, and the
//!   source's ready count must be 0; Kafka: high watermarks of the temporary topic; the Kafka
//!   baseline: its own first and last message). This is the steady rate, without start-up.
//! - end-to-end: from the start (shovel PUT, process spawn, consumer creation) to the same end.
//! - mqdrain's own JSON result: forwarded / (elapsed_secs - idle timeout); informative only,
//!   since the idle detection adds up to one 200 ms receive poll.
//!
//! Peak RSS is the forwarder process's `ru_maxrss`, read with wait4(2) when it exits, by a
//! small launcher process (see `launcher`) so that the bench's own memory is not counted.

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, FutureProducer, FutureRecord, Producer as _,
    ProducerContext,
};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use std::fmt::Write as _;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

type Res<T> = Result<T, String>;

const MIN_MESSAGES: u64 = 100_000;
const DEFAULT_RABBIT_MESSAGES: u64 = 200_000;
const DEFAULT_KAFKA_MESSAGES: u64 = 500_000;
const RABBIT_PAYLOAD: usize = 256;
const KAFKA_PAYLOAD: usize = 200;
const KAFKA_PARTITIONS: i32 = 3;
const FACTOR: usize = 4;
/// Unconfirmed publishes while seeding RabbitMQ (as in shared/README's reference figures).
const SEED_WINDOW: usize = 1000;
/// Undelivered records while seeding Kafka (below librdkafka's 100k local queue).
const KAFKA_SEED_WINDOW: usize = 50_000;
const POLL: Duration = Duration::from_millis(50);
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// A phase that makes no progress this long is a failure, not a slow result.
const STALL: Duration = Duration::from_secs(60);

const RABBIT_RSS_TARGET_MIB: f64 = 64.0;
const KAFKA_RSS_TARGET_MIB: f64 = 128.0;
const RABBIT_RATIO_TARGET: f64 = 1.25;
const KAFKA_RATIO_TARGET: f64 = 0.70;

const USAGE: &str = "\
Usage: scripts/bench [OPTIONS] [rabbit|kafka]
       cargo bench --bench drain -- [OPTIONS] [rabbit|kafka]

Measures mqdrain forward against the brokers' own baselines (RabbitMQ shovel, plain Kafka
consumer) in one run and prints rates, ratios and peak RSS, with references that bound any
forwarder on this machine (a plain lapin forwarder; an rdkafka consume->produce pipe). Needs the brokers of
`scripts/brokers up` (ports from MQDRAIN_AMQP_PORT, MQDRAIN_HTTP_PORT, MQDRAIN_KAFKA_PORT).

Options:
  --messages N         RabbitMQ backlog (default 200000, at least 100000;
                       env MQDRAIN_BENCH_MESSAGES)
  --kafka-messages M   Kafka backlog (default 500000, at least 100000;
                       env MQDRAIN_BENCH_KAFKA_MESSAGES)
  --no-scaling         skip the second forward on a 2x backlog (RSS vs backlog size)
  --rounds R           repeat baseline and forward R times, alternating which goes first,
                       and report the median ratio (default 1; shared machines are noisy)
  --forward-args ARGS  extra arguments for every `mqdrain forward`, split on spaces,
                       e.g. --forward-args \"--confirm-window 1500 --prefetch 3000\"
  --compare-bin PATH   also run `forward` with another mqdrain binary (e.g. a build of
                       main) on the same backlog size, and print this build's ratio to it
  rabbit | kafka       run only that broker's part
  -h, --help           this text";

struct Options {
    rabbit_messages: u64,
    kafka_messages: u64,
    rabbit: bool,
    kafka: bool,
    scaling: bool,
    forward_args: Vec<String>,
    compare_bin: Option<String>,
    rounds: usize,
}

/// `None` when not started by `cargo bench` (which passes `--bench`): `cargo test
/// --all-targets` builds and runs bench targets too, and must not run a minutes-long benchmark.
fn parse_options() -> Res<Option<Options>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|arg| arg == "-h" || arg == "--help") {
        println!("{USAGE}");
        std::process::exit(0);
    }
    if !args.iter().any(|arg| arg == "--bench") {
        return Ok(None);
    }
    let env_count = |name: &str, default: u64| -> Res<u64> {
        match std::env::var(name) {
            Ok(text) => parse_count(name, &text),
            Err(_) => Ok(default),
        }
    };
    let mut options = Options {
        rabbit_messages: env_count("MQDRAIN_BENCH_MESSAGES", DEFAULT_RABBIT_MESSAGES)?,
        kafka_messages: env_count("MQDRAIN_BENCH_KAFKA_MESSAGES", DEFAULT_KAFKA_MESSAGES)?,
        rabbit: true,
        kafka: true,
        scaling: true,
        forward_args: Vec::new(),
        compare_bin: None,
        rounds: 1,
    };
    let mut only: Option<String> = None;
    let mut rest = args.into_iter();
    while let Some(arg) = rest.next() {
        let mut value = |flag: &str| {
            rest.next()
                .ok_or_else(|| format!("{flag} needs a value\n\n{USAGE}"))
        };
        match arg.as_str() {
            "--bench" => {}
            "--messages" | "--rabbit-messages" => {
                options.rabbit_messages = parse_count(&arg, &value(&arg)?)?;
            }
            "--kafka-messages" => options.kafka_messages = parse_count(&arg, &value(&arg)?)?,
            "--no-scaling" => options.scaling = false,
            "--forward-args" => {
                options.forward_args = value(&arg)?
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
            }
            "--compare-bin" => options.compare_bin = Some(value(&arg)?),
            "--rounds" => {
                let text = value(&arg)?;
                options.rounds = text
                    .parse()
                    .ok()
                    .filter(|rounds| (1..=20).contains(rounds))
                    .ok_or_else(|| format!("--rounds: '{text}' is not a number from 1 to 20"))?;
            }
            "rabbit" | "rabbitmq" | "kafka" => only = Some(arg),
            other => return Err(format!("unknown argument '{other}'\n\n{USAGE}")),
        }
    }
    if let Some(only) = only {
        options.rabbit = only != "kafka";
        options.kafka = only == "kafka";
    }
    Ok(Some(options))
}

fn parse_count(what: &str, text: &str) -> Res<u64> {
    let count: u64 = text
        .replace('_', "")
        .parse()
        .map_err(|_| format!("{what}: '{text}' is not a number of messages"))?;
    if count < MIN_MESSAGES {
        return Err(format!(
            "{what}: {count} is too small; use at least {MIN_MESSAGES} (smaller backlogs measure start-up, not forwarding)"
        ));
    }
    Ok(count)
}

// ------------------------------------------------------------------ brokers

fn port(var: &str, default: u16) -> u16 {
    std::env::var(var)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

struct Brokers {
    amqp_url: String,
    management_url: String,
    kafka_bootstrap: String,
}

impl Brokers {
    fn from_env() -> Self {
        Brokers {
            amqp_url: format!(
                "amqp://guest:guest@127.0.0.1:{}/%2f",
                port("MQDRAIN_AMQP_PORT", 5672)
            ),
            management_url: format!("http://127.0.0.1:{}", port("MQDRAIN_HTTP_PORT", 15672)),
            kafka_bootstrap: format!("127.0.0.1:{}", port("MQDRAIN_KAFKA_PORT", 9092)),
        }
    }

    fn kafka_url(&self) -> String {
        format!("kafka://{}", self.kafka_bootstrap)
    }

    /// Fails with the command to run when a broker this run needs does not answer.
    async fn check(&self, options: &Options) -> Res<()> {
        let mut down = Vec::new();
        if options.rabbit {
            let amqp = port("MQDRAIN_AMQP_PORT", 5672);
            if !port_open(amqp) {
                down.push(format!("RabbitMQ AMQP on 127.0.0.1:{amqp}"));
            } else {
                let overview = http()
                    .get(format!("{}/api/overview", self.management_url))
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await;
                if !overview.is_ok_and(|response| response.status().is_success()) {
                    down.push(format!(
                        "RabbitMQ management API at {} (guest/guest)",
                        self.management_url
                    ));
                }
            }
        }
        if options.kafka {
            let kafka = port("MQDRAIN_KAFKA_PORT", 9092);
            if !port_open(kafka) {
                down.push(format!("Kafka (nisshi) on 127.0.0.1:{kafka}"));
            }
        }
        if down.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the brokers are not running: {} does not answer. Run `scripts/brokers up` first (or `scripts/bench`, which does it), with the same MQDRAIN_*_PORT variables",
                down.join(", ")
            ))
        }
    }
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .is_ok()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_default()
}

fn run_id() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    format!("bench-{}-{:x}", std::process::id(), secs & 0xff_ffff)
}

/// Everything the run created, removed at the end whatever happened.
#[derive(Default)]
struct Created {
    queues: Vec<String>,
    shovels: Vec<String>,
    topics: Vec<String>,
    groups: Vec<String>,
}

// ------------------------------------------------------------------ the mqdrain binary

fn mqdrain_binary() -> &'static str {
    env!("CARGO_BIN_EXE_mqdrain")
}

/// Runs mqdrain to completion; fails with its stderr when it exits non-zero.
fn mqdrain(args: &[String]) -> Res<Value> {
    let output = Command::new(mqdrain_binary())
        .args(args)
        .env_remove("MQDRAIN_URL")
        .env_remove("MQDRAIN_MANAGEMENT_URL")
        .output()
        .map_err(|error| format!("cannot run {}: {error}", mqdrain_binary()))?;
    if !output.status.success() {
        return Err(format!(
            "`mqdrain {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    serde_json::from_slice(&output.stdout).map_err(|error| {
        format!(
            "`mqdrain {}` printed no JSON ({error}): {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// First argument that turns the bench binary into the launcher of one mqdrain process.
const LAUNCHER: &str = "--launch-and-measure";

/// Launcher mode, `drain --launch-and-measure REPORT BINARY ARGS...`: runs BINARY with ARGS
/// (same stdin, stdout, stderr) and writes "exit-code peak-rss-kib cpu-µs" into REPORT.
///
/// Why a launcher: Linux charges a child's ru_maxrss with the RSS of the address space it had
/// before exec, i.e. a copy of its parent's. Forked from the bench itself, whose in-process
/// Kafka consumer alone holds 100+ MiB, the forwarder would be charged with the bench's memory;
/// forked from this fresh, small process, the figure is the forwarder's own.
fn launcher(args: &[String]) -> ! {
    let (Some(report), Some(binary)) = (args.first(), args.get(1)) else {
        eprintln!("drain bench: usage: {LAUNCHER} REPORT BINARY [ARGS...]");
        std::process::exit(2);
    };
    let child = match Command::new(binary).args(&args[2..]).spawn() {
        Ok(child) => child,
        Err(error) => {
            eprintln!("drain bench: cannot run {binary}: {error}");
            std::process::exit(127);
        }
    };
    let pid = libc::pid_t::try_from(child.id()).unwrap_or_default();
    let (status, usage) = match wait_rusage(pid) {
        Ok(waited) => waited,
        Err(error) => {
            eprintln!("drain bench: {error}");
            std::process::exit(1);
        }
    };
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    let timeval = |tv: libc::timeval| {
        u64::try_from(tv.tv_sec).unwrap_or_default() * 1_000_000
            + u64::try_from(tv.tv_usec).unwrap_or_default()
    };
    // Linux reports ru_maxrss in KiB.
    let line = format!(
        "{code} {} {}\n",
        usage.ru_maxrss,
        timeval(usage.ru_utime) + timeval(usage.ru_stime)
    );
    if let Err(error) = std::fs::write(report, line) {
        eprintln!("drain bench: cannot write {report}: {error}");
        std::process::exit(1);
    }
    std::process::exit(code);
}

/// Reaps `pid` (our own child) and returns its wait status and resource usage.
fn wait_rusage(pid: libc::pid_t) -> Res<(libc::c_int, libc::rusage)> {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to locals; pid is our own unreaped child.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if rc == pid {
            return Ok((status, usage));
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("wait4 on pid {pid}: {error}"));
        }
    }
}

/// A running mqdrain (under the launcher) whose resource usage is read when it exits.
struct Running {
    pid: libc::pid_t,
    args: Vec<String>,
    report: std::path::PathBuf,
    started: Instant,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

struct Finished {
    code: Option<i32>,
    wall: Duration,
    peak_rss_kib: u64,
    cpu: Duration,
    stdout: String,
    stderr: String,
}

fn spawn_mqdrain(binary: &str, args: Vec<String>) -> Res<Running> {
    static SPAWNED: AtomicU64 = AtomicU64::new(0);
    let launcher = std::env::current_exe()
        .map_err(|error| format!("cannot find the bench binary itself: {error}"))?;
    let report = std::env::temp_dir().join(format!(
        "mqdrain-bench-{}-{}.rusage",
        std::process::id(),
        SPAWNED.fetch_add(1, Ordering::Relaxed)
    ));
    let mut child = Command::new(launcher)
        .arg(LAUNCHER)
        .arg(&report)
        .arg(binary)
        .args(&args)
        .env_remove("MQDRAIN_URL")
        .env_remove("MQDRAIN_MANAGEMENT_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot run {binary}: {error}"))?;
    let started = Instant::now();
    let pid = libc::pid_t::try_from(child.id()).map_err(|_| "pid out of range".to_string())?;
    let mut out = child.stdout.take().ok_or("no stdout pipe")?;
    let mut err = child.stderr.take().ok_or("no stderr pipe")?;
    // Drained on threads, so that progress lines never fill a pipe and stall the forwarder.
    let stdout = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        text
    });
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    // `child` is dropped without waiting: wait4 below reaps it.
    Ok(Running {
        pid,
        args,
        report,
        started,
        stdout,
        stderr,
    })
}

impl Running {
    /// Blocks until the process exits; peak RSS and CPU come from the launcher's report.
    fn wait(self) -> Res<Finished> {
        wait_rusage(self.pid)?;
        let wall = self.started.elapsed();
        let stdout = self.stdout.join().unwrap_or_default();
        let stderr = self.stderr.join().unwrap_or_default();
        let report = std::fs::read_to_string(&self.report).map_err(|error| {
            format!(
                "the launcher of `mqdrain {}` left no report ({error}): {}",
                self.args.join(" "),
                last_lines(&stderr, 15)
            )
        })?;
        let _ = std::fs::remove_file(&self.report);
        let fields: Vec<u64> = report
            .split_whitespace()
            .filter_map(|field| field.parse().ok())
            .collect();
        let [code, peak_rss_kib, cpu_micros] = fields[..] else {
            return Err(format!("unreadable launcher report '{report}'"));
        };
        let finished = Finished {
            code: i32::try_from(code).ok(),
            wall,
            peak_rss_kib,
            cpu: Duration::from_micros(cpu_micros),
            stdout,
            stderr,
        };
        if finished.code != Some(0) {
            return Err(format!(
                "`mqdrain {}` failed (exit {:?}): {}",
                self.args.join(" "),
                finished.code,
                last_lines(&finished.stderr, 15)
            ));
        }
        Ok(finished)
    }
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// What `forward --output json` said about itself.
struct ForwardResult {
    forwarded: u64,
    elapsed_secs: f64,
    retries: u64,
    stopped_by: String,
}

fn forward_result(finished: &Finished) -> Res<ForwardResult> {
    let json: Value = serde_json::from_str(&finished.stdout)
        .map_err(|error| format!("forward printed no JSON ({error}): {}", finished.stdout))?;
    let result = &json["result"];
    Ok(ForwardResult {
        forwarded: result["forwarded"]
            .as_u64()
            .ok_or_else(|| format!("forward's JSON has no result.forwarded: {json}"))?,
        elapsed_secs: result["elapsed_secs"].as_f64().unwrap_or_default(),
        retries: result["retries"].as_u64().unwrap_or_default(),
        stopped_by: result["stopped_by"].as_str().unwrap_or("?").to_string(),
    })
}

// ------------------------------------------------------------------ timing

/// First and last observation of a transfer, against its start.
struct Transfer {
    started: Instant,
    broker: Broker,
    cpu_start: CpuSnapshot,
    cpu_done: Option<CpuSnapshot>,
    first: Option<Instant>,
    done: Option<Instant>,
    progress_at: Instant,
    last_seen: u64,
}

impl Transfer {
    fn new(started: Instant, broker: Broker) -> Self {
        Transfer {
            started,
            broker,
            cpu_start: CpuSnapshot::take(broker),
            cpu_done: None,
            first: None,
            done: None,
            progress_at: Instant::now(),
            last_seen: 0,
        }
    }

    /// Records one observation of `arrived` messages; true once `complete`.
    fn observe(&mut self, arrived: u64, complete: bool) -> Res<bool> {
        let now = Instant::now();
        if arrived > 0 && self.first.is_none() {
            self.first = Some(now);
        }
        if arrived != self.last_seen {
            self.last_seen = arrived;
            self.progress_at = now;
        } else if now - self.progress_at > STALL {
            return Err(format!(
                "no progress for {}s at {arrived} messages",
                STALL.as_secs()
            ));
        }
        if complete && self.done.is_none() {
            self.done = Some(now);
            self.cpu_done = Some(CpuSnapshot::take(self.broker));
        }
        Ok(self.done.is_some())
    }

    fn figures(&self, count: u64) -> Res<Rates> {
        let (Some(first), Some(done)) = (self.first, self.done) else {
            return Err("the transfer never completed".to_string());
        };
        let mut rates = Rates::new(count, done - first, done - self.started);
        rates.cpu = self
            .cpu_done
            .map(|end| CpuUse::between(self.cpu_start, end));
        Ok(rates)
    }
}

#[derive(Clone, Copy)]
struct Rates {
    count: u64,
    transfer: Duration,
    end_to_end: Duration,
    /// From the start to the end of the transfer.
    cpu: Option<CpuUse>,
}

impl Rates {
    fn new(count: u64, transfer: Duration, end_to_end: Duration) -> Self {
        Rates {
            count,
            transfer,
            end_to_end,
            cpu: None,
        }
    }

    fn transfer_rate(&self) -> f64 {
        per_sec(self.count, self.transfer)
    }

    fn end_to_end_rate(&self) -> f64 {
        per_sec(self.count, self.end_to_end)
    }
}

fn per_sec(count: u64, time: Duration) -> f64 {
    count as f64 / time.as_secs_f64().max(1e-9)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "?".to_string())
}

/// CPU time of the broker's processes and of the whole machine at one instant: what a phase
/// cost the broker, and whether the machine had CPU to spare during it.
#[derive(Clone, Copy)]
struct CpuSnapshot {
    broker_ticks: u64,
    machine_busy: u64,
    machine_total: u64,
}

/// Process name of the broker whose CPU is counted (`comm` in /proc).
#[derive(Clone, Copy)]
enum Broker {
    Rabbit,
    Kafka,
}

impl CpuSnapshot {
    fn take(broker: Broker) -> Self {
        let comm = match broker {
            Broker::Rabbit => "beam.smp",
            Broker::Kafka => "nisshi",
        };
        let mut broker_ticks = 0;
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let path = entry.path();
                let is_pid = path
                    .file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit()));
                if !is_pid {
                    continue;
                }
                let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
                    continue;
                };
                // "pid (comm) state ppid ...": utime and stime are fields 14 and 15.
                let Some((head, tail)) = stat.rsplit_once(") ") else {
                    continue;
                };
                if !head.ends_with(&format!("({comm}")) {
                    continue;
                }
                let fields: Vec<&str> = tail.split_whitespace().collect();
                let ticks = |index: usize| -> u64 {
                    fields
                        .get(index)
                        .and_then(|value| value.parse().ok())
                        .unwrap_or_default()
                };
                broker_ticks += ticks(11) + ticks(12);
            }
        }
        let (machine_busy, machine_total) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| {
                let line = text.lines().next()?.to_string();
                let values: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|value| value.parse().ok())
                    .collect();
                let total: u64 = values.iter().take(8).sum();
                // idle and iowait
                let idle = values.get(3).copied().unwrap_or_default()
                    + values.get(4).copied().unwrap_or_default();
                Some((total - idle, total))
            })
            .unwrap_or_default();
        CpuSnapshot {
            broker_ticks,
            machine_busy,
            machine_total,
        }
    }
}

/// Broker CPU seconds and machine busy share between two snapshots.
#[derive(Clone, Copy)]
struct CpuUse {
    broker_secs: f64,
    machine_busy: f64,
}

impl CpuUse {
    fn between(start: CpuSnapshot, end: CpuSnapshot) -> Self {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let total = end.machine_total.saturating_sub(start.machine_total).max(1);
        CpuUse {
            broker_secs: end.broker_ticks.saturating_sub(start.broker_ticks) as f64 / hz,
            machine_busy: end.machine_busy.saturating_sub(start.machine_busy) as f64 / total as f64,
        }
    }
}

// ------------------------------------------------------------------ report

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

struct Row {
    what: String,
    rates: Rates,
    rss_kib: Option<u64>,
    cpu: Option<Duration>,
}

impl Report {
    fn row(&mut self, what: impl Into<String>, rates: Rates, finished: Option<&Finished>) {
        let row = Row {
            what: what.into(),
            rates,
            rss_kib: finished.map(|f| f.peak_rss_kib),
            cpu: finished.map(|f| f.cpu),
        };
        println!("  done: {}", format_row(&row));
        self.rows.push(row);
    }

    fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        println!("  {text}");
        self.notes.push(text);
    }

    fn print(&self, title: &str) {
        let mut out = String::new();
        let _ = writeln!(out, "\n{title}");
        let _ = writeln!(
            out,
            "  {:<40} {:>8} {:>9} {:>9} {:>10} {:>9} {:>10} {:>8} {:>10} {:>8}",
            "",
            "messages",
            "transfer",
            "msg/s",
            "end-to-end",
            "msg/s",
            "peak RSS",
            "own CPU",
            "broker CPU",
            "machine"
        );
        for row in &self.rows {
            let _ = writeln!(out, "  {}", format_row(row));
        }
        for note in &self.notes {
            let _ = writeln!(out, "  {note}");
        }
        print!("{out}");
    }
}

fn format_row(row: &Row) -> String {
    let rates = &row.rates;
    format!(
        "{:<40} {:>8} {:>8.2}s {:>9.0} {:>9.2}s {:>9.0} {:>10} {:>8} {:>10} {:>8}",
        row.what,
        rates.count,
        rates.transfer.as_secs_f64(),
        rates.transfer_rate(),
        rates.end_to_end.as_secs_f64(),
        rates.end_to_end_rate(),
        row.rss_kib
            .map_or_else(|| "-".to_string(), |kib| format!("{:.1} MiB", mib(kib))),
        row.cpu.map_or_else(
            || "-".to_string(),
            |cpu| format!("{:.1}s", cpu.as_secs_f64())
        ),
        rates
            .cpu
            .map_or_else(|| "-".to_string(), |cpu| format!("{:.1}s", cpu.broker_secs)),
        rates.cpu.map_or_else(
            || "-".to_string(),
            |cpu| format!("{:.0}% busy", cpu.machine_busy * 100.0)
        ),
    )
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

// ------------------------------------------------------------------ RabbitMQ

async fn amqp_connection(brokers: &Brokers, purpose: &str) -> Res<Connection> {
    Connection::connect(
        &brokers.amqp_url,
        ConnectionProperties::default().with_connection_name(format!("bench {purpose}").into()),
    )
    .await
    .map_err(|error| format!("AMQP connection to {}: {error}", brokers.amqp_url))
}

async fn declare(channel: &Channel, queue: &str) -> Res<()> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|_| ())
        .map_err(|error| format!("declaring queue '{queue}': {error}"))
}

/// Ready messages of an existing queue (passive declare: exact, unlike management stats).
async fn ready(channel: &Channel, queue: &str) -> Res<u64> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|declared| u64::from(declared.message_count()))
        .map_err(|error| format!("counting queue '{queue}': {error}"))
}

/// Publishes `count` persistent messages with confirms, at most SEED_WINDOW unconfirmed.
async fn seed_queue(connection: &Connection, queue: &str, count: u64) -> Res<Rates> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|error| format!("channel: {error}"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|error| format!("confirm.select: {error}"))?;
    let mut payload = vec![b'x'; RABBIT_PAYLOAD];
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut nacked = 0u64;
    for index in 0..count {
        if pending.len() >= SEED_WINDOW {
            if let Some(confirm) = pending.next().await {
                nacked += confirmed(confirm)?;
            }
        }
        let label = format!("{index:012}");
        payload[..label.len()].copy_from_slice(label.as_bytes());
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .map_err(|error| format!("publishing into '{queue}': {error}"))?;
        pending.push(confirm);
    }
    while let Some(confirm) = pending.next().await {
        nacked += confirmed(confirm)?;
    }
    let elapsed = started.elapsed();
    let _ = channel.close(200, "seeded".into()).await;
    if nacked > 0 {
        return Err(format!("the broker nacked {nacked} seed messages"));
    }
    Ok(Rates::new(count, elapsed, elapsed))
}

fn confirmed(confirm: lapin::Result<lapin::Confirmation>) -> Res<u64> {
    match confirm {
        Ok(confirmation) if confirmation.is_ack() => Ok(0),
        Ok(_) => Ok(1),
        Err(error) => Err(format!("waiting for a publisher confirm: {error}")),
    }
}

/// Polls until the destinations hold `count` ready messages and the source has none ready.
async fn watch_queues(
    probe: &Channel,
    source: &str,
    destinations: &[String],
    count: u64,
    transfer: &mut Transfer,
    stop_early: impl Fn() -> bool,
) -> Res<()> {
    loop {
        let mut arrived = 0;
        for queue in destinations {
            arrived += ready(probe, queue).await?;
        }
        let left = ready(probe, source).await?;
        if transfer.observe(arrived, arrived >= count && left == 0)? || stop_early() {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn shovel(
    brokers: &Brokers,
    probe: &Channel,
    name: &str,
    source: &str,
    destination: &str,
    count: u64,
) -> Res<Rates> {
    let url = format!(
        "{}/api/parameters/shovel/%2f/{name}",
        brokers.management_url
    );
    let body = serde_json::json!({
        "value": {
            "src-protocol": "amqp091",
            "src-uri": "amqp://",
            "src-queue": source,
            "dest-protocol": "amqp091",
            "dest-uri": "amqp://",
            "dest-queue": destination,
            "ack-mode": "on-confirm",
            "src-delete-after": "queue-length",
        }
    });
    let started = Instant::now();
    let response = http()
        .put(&url)
        .basic_auth("guest", Some("guest"))
        .json(&body)
        .send()
        .await
        .map_err(|error| format!("creating shovel {name}: {error}"))?;
    if !response.status().is_success() {
        return Err(format!(
            "creating shovel {name}: HTTP {} {}",
            response.status(),
            response.text().await.unwrap_or_default()
        ));
    }
    let mut transfer = Transfer::new(started, Broker::Rabbit);
    watch_queues(
        probe,
        source,
        &[destination.to_string()],
        count,
        &mut transfer,
        || false,
    )
    .await?;
    transfer.figures(count)
}

/// The reference the issue quotes: a plain lapin forwarder in this process. It consumes with a
/// prefetch, publishes round-robin into the destinations with confirms (at most SEED_WINDOW
/// unconfirmed), and acks `multiple` after each contiguous run of confirms — nothing else (no
/// bookkeeping, no headers, no progress). What a client-side forwarder costs at the least.
async fn plain_forwarder(
    brokers: &Brokers,
    probe: &Channel,
    source: &str,
    destinations: &[String],
    count: u64,
) -> Res<Rates> {
    const PREFETCH: u16 = 2000;
    const ACK_EVERY: u64 = 100;
    let connection = amqp_connection(brokers, "plain lapin forwarder").await?;
    let consuming = connection
        .create_channel()
        .await
        .map_err(|error| format!("channel: {error}"))?;
    consuming
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(|error| format!("basic.qos: {error}"))?;
    let publishing = connection
        .create_channel()
        .await
        .map_err(|error| format!("channel: {error}"))?;
    publishing
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|error| format!("confirm.select: {error}"))?;
    let mut consumer = consuming
        .basic_consume(
            source.into(),
            "bench-plain-forwarder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|error| format!("consuming '{source}': {error}"))?;
    let started = Instant::now();
    let targets = destinations.to_vec();
    let forwarding = tokio::spawn(async move {
        let mut pending = std::collections::VecDeque::new();
        let mut unacked = 0u64;
        let mut last_confirmed = 0u64;
        let mut settle = |tag: u64,
                          confirm: lapin::Result<lapin::Confirmation>,
                          unacked: &mut u64|
         -> Res<bool> {
            if confirmed(confirm)? > 0 {
                return Err("the broker nacked a forwarded message".to_string());
            }
            last_confirmed = tag;
            *unacked += 1;
            Ok(*unacked >= ACK_EVERY)
        };
        for index in 0..count {
            let delivery = consumer
                .next()
                .await
                .ok_or("the consumer ended")?
                .map_err(|error| format!("consuming: {error}"))?;
            let confirm = publishing
                .basic_publish(
                    "".into(),
                    targets[index as usize % targets.len()].as_str().into(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    delivery.properties.clone(),
                )
                .await
                .map_err(|error| format!("publishing: {error}"))?;
            pending.push_back((delivery.delivery_tag, confirm));
            if pending.len() >= SEED_WINDOW {
                if let Some((tag, confirm)) = pending.pop_front() {
                    if settle(tag, confirm.await, &mut unacked)? {
                        consuming
                            .basic_ack(tag, BasicAckOptions { multiple: true })
                            .await
                            .map_err(|error| format!("acking: {error}"))?;
                        unacked = 0;
                    }
                }
            }
        }
        while let Some((tag, confirm)) = pending.pop_front() {
            settle(tag, confirm.await, &mut unacked)?;
        }
        if unacked > 0 {
            consuming
                .basic_ack(last_confirmed, BasicAckOptions { multiple: true })
                .await
                .map_err(|error| format!("acking: {error}"))?;
        }
        Res::Ok(())
    });
    let mut transfer = Transfer::new(started, Broker::Rabbit);
    // Stops watching early only to report a failed forwarder's own error.
    watch_queues(probe, source, destinations, count, &mut transfer, || {
        forwarding.is_finished()
    })
    .await?;
    let outcome = forwarding
        .await
        .map_err(|error| format!("the plain forwarder task: {error}"))?;
    outcome?;
    // It finished between two observations: the last one is still to be made.
    watch_queues(probe, source, destinations, count, &mut transfer, || false).await?;
    let _ = connection.close(200, "done".into()).await;
    transfer.figures(count)
}

struct ForwardRun {
    rates: Rates,
    finished: Finished,
    result: ForwardResult,
}

/// `mqdrain expand` then `mqdrain forward` on `queue`, watched from outside.
async fn forward_queue(
    brokers: &Brokers,
    options: &Options,
    probe: &Channel,
    queue: &str,
    count: u64,
    binary: &str,
) -> Res<ForwardRun> {
    let connection_args = vec![
        "--url".to_string(),
        brokers.amqp_url.clone(),
        "--management-url".to_string(),
        brokers.management_url.clone(),
        "--output".to_string(),
        "json".to_string(),
    ];
    let mut expand = connection_args.clone();
    expand.extend([
        "expand".to_string(),
        queue.to_string(),
        "--factor".to_string(),
        FACTOR.to_string(),
    ]);
    mqdrain(&expand)?;
    let temps: Vec<String> = (0..FACTOR)
        .map(|index| format!("{queue}.drain.{index}"))
        .collect();
    let mut forward = connection_args;
    forward.extend([
        "forward".to_string(),
        queue.to_string(),
        "--idle-timeout".to_string(),
        format!("{}s", IDLE_TIMEOUT.as_secs()),
    ]);
    forward.extend(options.forward_args.iter().cloned());
    let running = spawn_mqdrain(binary, forward)?;
    let mut transfer = Transfer::new(running.started, Broker::Rabbit);
    let waiter = tokio::task::spawn_blocking(move || running.wait());
    let watched = watch_queues(probe, queue, &temps, count, &mut transfer, || {
        waiter.is_finished()
    })
    .await;
    let finished = waiter
        .await
        .map_err(|error| format!("waiting for forward: {error}"))??;
    watched?;
    if transfer.done.is_none() {
        // The process ended before a poll saw the end: one last look.
        let mut arrived = 0;
        for temp in &temps {
            arrived += ready(probe, temp).await?;
        }
        return Err(format!(
            "forward exited but the temporary queues hold {arrived} of {count} messages; stderr: {}",
            last_lines(&finished.stderr, 10)
        ));
    }
    let result = forward_result(&finished)?;
    if result.forwarded != count {
        return Err(format!(
            "forward reported {} forwarded, expected {count}",
            result.forwarded
        ));
    }
    Ok(ForwardRun {
        rates: transfer.figures(count)?,
        finished,
        result,
    })
}

fn own_figure(run: &ForwardRun) -> String {
    let active = run.result.elapsed_secs - IDLE_TIMEOUT.as_secs_f64();
    format!(
        "forward's own JSON: forwarded {} in elapsed {:.2}s of a {:.2}s process (stopped by {}, {} retries) -> {:.0} msg/s after subtracting the {}s idle timeout",
        run.result.forwarded,
        run.result.elapsed_secs,
        run.finished.wall.as_secs_f64(),
        run.result.stopped_by,
        run.result.retries,
        run.result.forwarded as f64 / active.max(1e-9),
        IDLE_TIMEOUT.as_secs()
    )
}

async fn delete_queue(channel: &Channel, queue: &str) {
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
}

/// One round's figures: the baseline and the forward(s) that ran right after it.
struct RabbitRound {
    shovel: Rates,
    plain: Rates,
    forward: ForwardRun,
    compare: Option<ForwardRun>,
}

/// The bench's own AMQP connection: seeding, and a channel for passive declares.
struct Amqp {
    connection: Connection,
    probe: Channel,
}

async fn rabbit_round(
    brokers: &Brokers,
    options: &Options,
    amqp: &Amqp,
    prefix: &str,
    round: usize,
    created: &mut Created,
    report: &mut Report,
) -> Res<RabbitRound> {
    let n = options.rabbit_messages;
    let (connection, probe) = (&amqp.connection, &amqp.probe);
    let shovel_src = format!("{prefix}-shovel-src");
    let shovel_dst = format!("{prefix}-shovel-dst");
    let shovel_name = format!("{prefix}-shovel");
    let forward_src = format!("{prefix}-fwd");
    let forward_cmp = format!("{prefix}-cmp");
    let plain_src = format!("{prefix}-plain");
    let plain_dst: Vec<String> = (0..FACTOR)
        .map(|index| format!("{plain_src}.drain.{index}"))
        .collect();
    let mut sources = vec![&forward_src];
    if options.compare_bin.is_some() {
        sources.push(&forward_cmp);
    }
    for queue in [&shovel_src, &shovel_dst, &plain_src]
        .into_iter()
        .chain(&plain_dst)
        .chain(sources.clone())
    {
        created.queues.push(queue.clone());
        declare(probe, queue).await?;
    }
    for source in &sources {
        for index in 0..FACTOR {
            created.queues.push(format!("{source}.drain.{index}"));
        }
    }
    let label = if options.rounds > 1 {
        format!(" #{}", round + 1)
    } else {
        String::new()
    };

    println!("RabbitMQ{label}: seeding {n} persistent {RABBIT_PAYLOAD}-byte messages into '{shovel_src}' and '{forward_src}'");
    let seeded = seed_queue(connection, &shovel_src, n).await?;
    report.note(format!(
        "seed{label} (confirms, window {SEED_WINDOW}): {:.0} msg/s",
        seeded.transfer_rate()
    ));
    seed_queue(connection, &forward_src, n).await?;
    seed_queue(connection, &plain_src, n).await?;
    if options.compare_bin.is_some() {
        seed_queue(connection, &forward_cmp, n).await?;
    }

    // Every other round the forward goes first, so that neither side always runs second.
    let mut shovel_rates = None;
    let mut forward = None;
    for step in 0..2 {
        if (step + round) % 2 == 0 {
            println!("RabbitMQ{label}: baseline, dynamic shovel '{shovel_name}' (ack-mode on-confirm) {shovel_src} -> {shovel_dst}");
            created.shovels.push(shovel_name.clone());
            let rates = shovel(brokers, probe, &shovel_name, &shovel_src, &shovel_dst, n).await?;
            report.row(
                format!("shovel (on-confirm) -> 1 queue{label}"),
                rates,
                None,
            );
            shovel_rates = Some(rates);
        } else {
            println!("RabbitMQ{label}: mqdrain expand {forward_src} --factor {FACTOR}; mqdrain forward {forward_src} --idle-timeout 2s");
            let run =
                forward_queue(brokers, options, probe, &forward_src, n, mqdrain_binary()).await?;
            report.row(
                format!("mqdrain forward -> {FACTOR} queues{label}"),
                run.rates,
                Some(&run.finished),
            );
            report.note(own_figure(&run));
            forward = Some(run);
        }
    }
    let (Some(shovel_rates), Some(forward)) = (shovel_rates, forward) else {
        return Err("a round did not run both sides".to_string());
    };
    println!("RabbitMQ{label}: reference, a plain lapin forwarder {plain_src} -> {FACTOR} queues");
    let plain = plain_forwarder(brokers, probe, &plain_src, &plain_dst, n).await?;
    report.row(
        format!("reference: plain lapin forwarder -> {FACTOR} queues{label}"),
        plain,
        None,
    );
    let mut compare = None;
    if let Some(binary) = &options.compare_bin {
        println!("RabbitMQ{label}: the same forward with {binary} on '{forward_cmp}'");
        let run = forward_queue(brokers, options, probe, &forward_cmp, n, binary).await?;
        report.row(
            format!("forward of --compare-bin -> {FACTOR} queues{label}"),
            run.rates,
            Some(&run.finished),
        );
        report.note(own_figure(&run));
        compare = Some(run);
    }
    // Each round's queues go before the next seed, so that the broker holds about as much
    // in every round.
    for queue in created.queues.drain(..) {
        delete_queue(probe, &queue).await;
    }
    Ok(RabbitRound {
        shovel: shovel_rates,
        plain,
        forward,
        compare,
    })
}

async fn rabbit_bench(
    brokers: &Brokers,
    options: &Options,
    run: &str,
    created: &mut Created,
) -> Res<Report> {
    let n = options.rabbit_messages;
    let mut report = Report::default();
    let connection = amqp_connection(brokers, "seed").await?;
    let probe = connection
        .create_channel()
        .await
        .map_err(|error| format!("channel: {error}"))?;
    let amqp = Amqp { connection, probe };
    let (connection, probe) = (&amqp.connection, &amqp.probe);
    let mut rounds = Vec::new();
    for round in 0..options.rounds {
        let prefix = format!("{run}-r{round}");
        rounds.push(
            rabbit_round(
                brokers,
                options,
                &amqp,
                &prefix,
                round,
                created,
                &mut report,
            )
            .await?,
        );
    }

    let mut two: Option<ForwardRun> = None;
    if options.scaling {
        let forward_2x = format!("{run}-fwd-2x");
        created.queues.push(forward_2x.clone());
        for index in 0..FACTOR {
            created.queues.push(format!("{forward_2x}.drain.{index}"));
        }
        declare(probe, &forward_2x).await?;
        println!(
            "RabbitMQ: RSS vs backlog, seeding {} into '{forward_2x}' and forwarding it",
            2 * n
        );
        seed_queue(connection, &forward_2x, 2 * n).await?;
        let run2 = forward_queue(
            brokers,
            options,
            probe,
            &forward_2x,
            2 * n,
            mqdrain_binary(),
        )
        .await?;
        report.row(
            format!("mqdrain forward, 2x backlog -> {FACTOR} queues"),
            run2.rates,
            Some(&run2.finished),
        );
        report.note(own_figure(&run2));
        two = Some(run2);
    }

    let ratios: Vec<f64> = rounds
        .iter()
        .map(|r| r.forward.rates.transfer_rate() / r.shovel.transfer_rate())
        .collect();
    let ratios_e2e: Vec<f64> = rounds
        .iter()
        .map(|r| r.forward.rates.end_to_end_rate() / r.shovel.end_to_end_rate())
        .collect();
    let ratio = median(&ratios);
    report.note(format!(
        "ratio forward/shovel: {ratio:.2}x transfer, {:.2}x end-to-end{} (target >= {RABBIT_RATIO_TARGET}x: {})",
        median(&ratios_e2e),
        rounds_text(&ratios),
        verdict(ratio >= RABBIT_RATIO_TARGET)
    ));
    let plain_ratios: Vec<f64> = rounds
        .iter()
        .map(|r| r.plain.transfer_rate() / r.shovel.transfer_rate())
        .collect();
    let forward_to_plain: Vec<f64> = rounds
        .iter()
        .map(|r| r.forward.rates.transfer_rate() / r.plain.transfer_rate())
        .collect();
    report.note(format!(
        "ratio plain lapin forwarder/shovel: {:.2}x{}; forward/plain lapin forwarder: {:.2}x{}",
        median(&plain_ratios),
        rounds_text(&plain_ratios),
        median(&forward_to_plain),
        rounds_text(&forward_to_plain)
    ));
    let cpu_lines: Vec<String> = rounds
        .iter()
        .filter_map(|r| {
            let shovel = r.shovel.cpu?.broker_secs;
            let forward = r.forward.rates.cpu?.broker_secs;
            let own = r.forward.finished.cpu.as_secs_f64();
            let per = |secs: f64| secs * 1e6 / n as f64;
            Some(format!(
                "shovel {:.0} (broker) vs forward {:.0} (broker) + {:.0} (mqdrain)",
                per(shovel),
                per(forward),
                per(own)
            ))
        })
        .collect();
    if !cpu_lines.is_empty() {
        report.note(format!("CPU per message in µs: {}", cpu_lines.join("; ")));
    }
    if options.compare_bin.is_some() {
        let ratios: Vec<f64> = rounds
            .iter()
            .filter_map(|r| {
                let other = r.compare.as_ref()?;
                Some(r.forward.rates.transfer_rate() / other.rates.transfer_rate())
            })
            .collect();
        report.note(format!(
            "ratio this build/--compare-bin: {:.2}x transfer{}",
            median(&ratios),
            rounds_text(&ratios)
        ));
    }
    let rss_one: Vec<f64> = rounds
        .iter()
        .map(|r| mib(r.forward.finished.peak_rss_kib))
        .collect();
    let rss = rss_one.iter().copied().fold(0.0, f64::max);
    let mut rss_line = format!("peak RSS of forward: {rss:.1} MiB at {n}");
    let mut worst = rss;
    if let Some(two) = &two {
        let rss2 = mib(two.finished.peak_rss_kib);
        worst = worst.max(rss2);
        let _ = write!(
            rss_line,
            ", {rss2:.1} MiB at {} ({:+.1}%)",
            2 * n,
            (rss2 / rss - 1.0) * 100.0
        );
    }
    let _ = write!(
        rss_line,
        " (target < {RABBIT_RSS_TARGET_MIB} MiB: {})",
        verdict(worst < RABBIT_RSS_TARGET_MIB)
    );
    report.note(rss_line);

    for queue in created.queues.drain(..) {
        delete_queue(probe, &queue).await;
    }
    let _ = connection.close(200, "bench done".into()).await;
    Ok(report)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => sorted[len / 2],
        len => (sorted[len / 2 - 1] + sorted[len / 2]) / 2.0,
    }
}

/// " (median of rounds 1.10, 1.31, 1.22)" when there were several rounds.
fn rounds_text(values: &[f64]) -> String {
    if values.len() < 2 {
        return String::new();
    }
    let list: Vec<String> = values.iter().map(|v| format!("{v:.2}")).collect();
    format!(" (median of rounds {})", list.join(", "))
}

async fn rabbit_cleanup(brokers: &Brokers, created: &mut Created) -> Vec<String> {
    let mut problems = Vec::new();
    for name in created.shovels.drain(..) {
        let url = format!(
            "{}/api/parameters/shovel/%2f/{name}",
            brokers.management_url
        );
        match http()
            .delete(&url)
            .basic_auth("guest", Some("guest"))
            .send()
            .await
        {
            // 404: the shovel deleted itself after moving the queue's length.
            Ok(response) if response.status().is_success() || response.status() == 404 => {}
            Ok(response) => problems.push(format!("shovel {name}: HTTP {}", response.status())),
            Err(error) => problems.push(format!("shovel {name}: {error}")),
        }
    }
    if created.queues.is_empty() {
        return problems;
    }
    match amqp_connection(brokers, "cleanup").await {
        Ok(connection) => {
            for queue in created.queues.drain(..) {
                // A failed delete closes the channel: one channel per queue.
                match connection.create_channel().await {
                    Ok(channel) => {
                        if let Err(error) = channel
                            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                            .await
                        {
                            problems.push(format!("queue {queue}: {error}"));
                        }
                    }
                    Err(error) => problems.push(format!("queue {queue}: {error}")),
                }
            }
            let _ = connection.close(200, "cleanup done".into()).await;
        }
        Err(error) => problems.push(error),
    }
    problems
}

// ------------------------------------------------------------------ Kafka

fn kafka_config(brokers: &Brokers) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &brokers.kafka_bootstrap)
        .set("log_level", "3");
    config
}

fn kafka_admin(brokers: &Brokers) -> Res<AdminClient<DefaultClientContext>> {
    kafka_config(brokers)
        .create()
        .map_err(|error| format!("Kafka admin client: {error}"))
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().request_timeout(Some(Duration::from_secs(30)))
}

async fn create_topic(brokers: &Brokers, topic: &str, partitions: i32) -> Res<()> {
    let admin = kafka_admin(brokers)?;
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics([&new_topic], &admin_options())
        .await
        .map_err(|error| format!("creating topic '{topic}': {error}"))?;
    for result in results {
        result.map_err(|(name, code)| format!("creating topic '{name}': {code}"))?;
    }
    Ok(())
}

/// Produces `count` records round-robin over the partitions; returns once all are delivered.
async fn seed_topic(brokers: &Brokers, topic: &str, count: u64) -> Res<Rates> {
    let producer: FutureProducer = kafka_config(brokers)
        .set("linger.ms", "5")
        .set("acks", "all")
        .create()
        .map_err(|error| format!("Kafka producer: {error}"))?;
    let mut payload = [b'y'; KAFKA_PAYLOAD];
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for index in 0..count {
        while pending.len() >= KAFKA_SEED_WINDOW {
            delivered(pending.next().await)?;
        }
        let label = format!("{index:012}");
        payload[..label.len()].copy_from_slice(label.as_bytes());
        let key = format!("key-{}", index % 1024);
        let partition = i32::try_from(index % KAFKA_PARTITIONS as u64).unwrap_or_default();
        let mut record = FutureRecord::to(topic)
            .partition(partition)
            .key(key.as_bytes())
            .payload(&payload[..]);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    if pending.is_empty() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    } else {
                        delivered(pending.next().await)?;
                    }
                }
                Err((error, _)) => return Err(format!("producing into '{topic}': {error}")),
            }
        }
    }
    while !pending.is_empty() {
        delivered(pending.next().await)?;
    }
    let elapsed = started.elapsed();
    Ok(Rates::new(count, elapsed, elapsed))
}

fn delivered<E>(
    delivery: Option<Result<rdkafka::producer::future_producer::OwnedDeliveryResult, E>>,
) -> Res<()> {
    match delivery {
        Some(Ok(Ok(_))) | None => Ok(()),
        Some(Ok(Err((error, _)))) => Err(format!("a seed record was not delivered: {error}")),
        Some(Err(_)) => Err("the seed producer shut down".to_string()),
    }
}

/// The baseline: a new group reads the whole topic from the earliest offsets, doing nothing else.
fn consume_all(brokers: &Brokers, topic: &str, group: &str, count: u64) -> Res<Rates> {
    let started = Instant::now();
    let consumer: BaseConsumer = kafka_config(brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|error| format!("Kafka consumer: {error}"))?;
    consumer
        .subscribe(&[topic])
        .map_err(|error| format!("subscribing to '{topic}': {error}"))?;
    let mut transfer = Transfer::new(started, Broker::Kafka);
    let mut seen = 0u64;
    let mut bytes = 0usize;
    while seen < count {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                seen += 1;
                bytes += message.payload_len();
                if seen == 1 || seen == count {
                    transfer.observe(seen, seen == count)?;
                }
            }
            Some(Err(error)) => return Err(format!("consuming '{topic}': {error}")),
            None => {
                transfer.observe(seen, false)?;
            }
        }
    }
    if bytes == 0 {
        return Err("the baseline consumer read empty payloads".to_string());
    }
    consumer.unsubscribe();
    transfer.figures(count)
}

/// Counts the reference pipe's deliveries (librdkafka's delivery reports).
#[derive(Default)]
struct Deliveries {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let counter = if result.is_ok() {
            &self.ok
        } else {
            &self.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A reference point, not a target: what rdkafka itself does when it consumes the topic and
/// produces every record into a 12-partition topic with the forwarder's producer settings
/// (idempotent, acks=all, linger 5 ms), with no window, no acknowledgement bookkeeping and no
/// commits. A forwarder cannot beat this on the same broker.
fn reference_pipe(
    brokers: &Brokers,
    topic: &str,
    sink_topic: &str,
    group: &str,
    count: u64,
) -> Res<Rates> {
    use rdkafka::Message as _;
    let started = Instant::now();
    let consumer: BaseConsumer = kafka_config(brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|error| format!("Kafka consumer: {error}"))?;
    let producer: BaseProducer<Deliveries> = kafka_config(brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create_with_context(Deliveries::default())
        .map_err(|error| format!("Kafka producer: {error}"))?;
    consumer
        .subscribe(&[topic])
        .map_err(|error| format!("subscribing to '{topic}': {error}"))?;
    let mut transfer = Transfer::new(started, Broker::Kafka);
    let mut consumed = 0u64;
    loop {
        let delivered = producer.context().ok.load(Ordering::Relaxed);
        let failed = producer.context().failed.load(Ordering::Relaxed);
        if failed > 0 {
            return Err(format!(
                "the reference pipe failed to deliver {failed} records"
            ));
        }
        if transfer.observe(delivered, delivered >= count)? {
            break;
        }
        if consumed >= count {
            producer.poll(Duration::from_millis(10));
            continue;
        }
        match consumer.poll(Duration::from_millis(10)) {
            Some(Ok(message)) => {
                consumed += 1;
                let partition =
                    message.partition() * FACTOR as i32 + (consumed % FACTOR as u64) as i32;
                let mut record: BaseRecord<'_, [u8], [u8]> =
                    BaseRecord::to(sink_topic).partition(partition);
                if let Some(key) = message.key() {
                    record = record.key(key);
                }
                if let Some(payload) = message.payload() {
                    record = record.payload(payload);
                }
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            record = back;
                            producer.poll(Duration::from_millis(10));
                        }
                        Err((error, _)) => {
                            return Err(format!("producing into '{sink_topic}': {error}"))
                        }
                    }
                }
                producer.poll(Duration::ZERO);
            }
            Some(Err(error)) => return Err(format!("consuming '{topic}': {error}")),
            None => producer.poll(Duration::ZERO),
        }
    }
    consumer.unsubscribe();
    transfer.figures(count)
}

/// Commits offset 0 on every partition for `group` from a client that never joins it: forward
/// refuses a group with no offsets at all (a mistyped group would forward the whole history).
fn commit_zero(brokers: &Brokers, topic: &str, group: &str) -> Res<()> {
    let consumer: BaseConsumer = kafka_config(brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|error| format!("Kafka consumer: {error}"))?;
    let mut list = TopicPartitionList::new();
    for partition in 0..KAFKA_PARTITIONS {
        list.add_partition_offset(topic, partition, Offset::Offset(0))
            .map_err(|error| format!("offset list: {error}"))?;
    }
    consumer
        .commit(&list, CommitMode::Sync)
        .map_err(|error| format!("committing offset 0 for group '{group}': {error}"))
}

/// Sum of the high watermarks of `partitions` partitions of `topic`.
fn watermark_sum(consumer: &BaseConsumer, topic: &str, partitions: i32) -> Res<u64> {
    let mut sum = 0;
    for partition in 0..partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .map_err(|error| format!("watermarks of {topic}[{partition}]: {error}"))?;
        sum += u64::try_from(high).unwrap_or_default();
    }
    Ok(sum)
}

fn forward_topic(
    brokers: &Brokers,
    options: &Options,
    topic: &str,
    group: &str,
    count: u64,
    binary: &str,
    temp: &str,
) -> Res<ForwardRun> {
    let connection_args = vec![
        "--url".to_string(),
        brokers.kafka_url(),
        "--output".to_string(),
        "json".to_string(),
    ];
    let mut expand = connection_args.clone();
    expand.extend([
        "expand".to_string(),
        topic.to_string(),
        "--factor".to_string(),
        FACTOR.to_string(),
        "--temp-topic".to_string(),
        temp.to_string(),
    ]);
    mqdrain(&expand)?;
    commit_zero(brokers, topic, group)?;
    let temp_partitions = KAFKA_PARTITIONS * i32::try_from(FACTOR).unwrap_or(1);
    let watcher: BaseConsumer = kafka_config(brokers)
        .create()
        .map_err(|error| format!("Kafka watcher: {error}"))?;
    let mut forward = connection_args;
    forward.extend([
        "forward".to_string(),
        topic.to_string(),
        "--group".to_string(),
        group.to_string(),
        "--temp-topic".to_string(),
        temp.to_string(),
        "--idle-timeout".to_string(),
        format!("{}s", IDLE_TIMEOUT.as_secs()),
    ]);
    forward.extend(options.forward_args.iter().cloned());
    let running = spawn_mqdrain(binary, forward)?;
    let mut transfer = Transfer::new(running.started, Broker::Kafka);
    let exited = Arc::new(AtomicBool::new(false));
    let exited_flag = Arc::clone(&exited);
    let waiter = std::thread::spawn(move || {
        let finished = running.wait();
        exited_flag.store(true, Ordering::SeqCst);
        finished
    });
    let mut watched = Ok(());
    while !exited.load(Ordering::SeqCst) {
        match watermark_sum(&watcher, temp, temp_partitions)
            .and_then(|arrived| transfer.observe(arrived, arrived >= count))
        {
            Ok(true) => break,
            Ok(false) => std::thread::sleep(POLL),
            Err(error) => {
                watched = Err(error);
                break;
            }
        }
    }
    let finished = waiter
        .join()
        .map_err(|_| "the wait4 thread panicked".to_string())??;
    watched?;
    if transfer.done.is_none() {
        let arrived = watermark_sum(&watcher, temp, temp_partitions)?;
        return Err(format!(
            "forward exited but '{temp}' holds {arrived} of {count} records; stderr: {}",
            last_lines(&finished.stderr, 10)
        ));
    }
    let result = forward_result(&finished)?;
    if result.forwarded != count {
        return Err(format!(
            "forward reported {} forwarded, expected {count}",
            result.forwarded
        ));
    }
    Ok(ForwardRun {
        rates: transfer.figures(count)?,
        finished,
        result,
    })
}

/// Runs a blocking Kafka phase off the async runtime.
async fn blocking<T: Send + 'static>(
    what: &str,
    call: impl FnOnce() -> Res<T> + Send + 'static,
) -> Res<T> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|error| format!("{what}: {error}"))?
}

struct KafkaRound {
    baseline: Rates,
    pipe: Rates,
    forward: ForwardRun,
    compare: Option<ForwardRun>,
}

async fn kafka_round(
    brokers: &Arc<Brokers>,
    options: &Arc<Options>,
    topic: &str,
    round: usize,
    created: &mut Created,
    report: &mut Report,
) -> Res<KafkaRound> {
    let m = options.kafka_messages;
    let label = if options.rounds > 1 {
        format!(" #{}", round + 1)
    } else {
        String::new()
    };
    let baseline_group = format!("{topic}-r{round}-plain");
    let pipe_group = format!("{topic}-r{round}-pipe");
    let pipe_topic = format!("{topic}-r{round}-pipe");
    let forward_group = format!("{topic}-r{round}-fwd");
    let forward_temp = format!("{topic}.drain{round}");
    created.groups.extend([
        baseline_group.clone(),
        pipe_group.clone(),
        forward_group.clone(),
    ]);
    created
        .topics
        .extend([pipe_topic.clone(), forward_temp.clone()]);

    println!(
        "Kafka{label}: baseline, a plain consumer (group '{baseline_group}') reads the whole topic"
    );
    let baseline = {
        let (brokers, topic) = (Arc::clone(brokers), topic.to_string());
        blocking("baseline consumer", move || {
            consume_all(&brokers, &topic, &baseline_group, m)
        })
        .await?
    };
    report.row(
        format!("plain rdkafka consumer (read only){label}"),
        baseline,
        None,
    );

    let temp_partitions = KAFKA_PARTITIONS * FACTOR as i32;
    println!("Kafka{label}: reference, an rdkafka consume->produce pipe into '{pipe_topic}' ({temp_partitions} partitions)");
    create_topic(brokers, &pipe_topic, temp_partitions).await?;
    let pipe = {
        let (brokers, topic) = (Arc::clone(brokers), topic.to_string());
        blocking("reference pipe", move || {
            reference_pipe(&brokers, &topic, &pipe_topic, &pipe_group, m)
        })
        .await?
    };
    report.row(
        format!("reference: consume->produce pipe{label}"),
        pipe,
        None,
    );

    println!("Kafka{label}: mqdrain expand {topic} --factor {FACTOR} --temp-topic {forward_temp}; mqdrain forward {topic} --group {forward_group} --temp-topic {forward_temp} --idle-timeout 2s");
    let forward = {
        let (brokers, options, topic) =
            (Arc::clone(brokers), Arc::clone(options), topic.to_string());
        blocking("forward", move || {
            forward_topic(
                &brokers,
                &options,
                &topic,
                &forward_group,
                m,
                mqdrain_binary(),
                &forward_temp,
            )
        })
        .await?
    };
    report.row(
        format!("mqdrain forward -> {temp_partitions} partitions{label}"),
        forward.rates,
        Some(&forward.finished),
    );
    report.note(own_figure(&forward));

    let mut compare = None;
    if let Some(binary) = options.compare_bin.clone() {
        let compare_group = format!("{topic}-r{round}-cmp");
        let compare_temp = format!("{topic}.cmp{round}");
        created.groups.push(compare_group.clone());
        created.topics.push(compare_temp.clone());
        println!("Kafka{label}: the same forward with {binary} into '{compare_temp}'");
        let run = {
            let (brokers, options, topic) =
                (Arc::clone(brokers), Arc::clone(options), topic.to_string());
            blocking("forward", move || {
                forward_topic(
                    &brokers,
                    &options,
                    &topic,
                    &compare_group,
                    m,
                    &binary,
                    &compare_temp,
                )
            })
            .await?
        };
        report.row(
            format!("forward of --compare-bin{label}"),
            run.rates,
            Some(&run.finished),
        );
        report.note(own_figure(&run));
        compare = Some(run);
    }
    Ok(KafkaRound {
        baseline,
        pipe,
        forward,
        compare,
    })
}

async fn kafka_bench(
    brokers: Arc<Brokers>,
    options: Arc<Options>,
    run: &str,
    created: &mut Created,
) -> Res<Report> {
    let m = options.kafka_messages;
    let mut report = Report::default();
    let topic = format!("{run}-topic");
    created.topics.push(topic.clone());

    println!("Kafka: producing {m} {KAFKA_PAYLOAD}-byte records into '{topic}' ({KAFKA_PARTITIONS} partitions)");
    create_topic(&brokers, &topic, KAFKA_PARTITIONS).await?;
    let seeded = seed_topic(&brokers, &topic, m).await?;
    report.note(format!(
        "produce (acks=all, linger 5 ms): {:.0} msg/s",
        seeded.transfer_rate()
    ));
    let mut rounds = Vec::new();
    for round in 0..options.rounds {
        rounds.push(kafka_round(&brokers, &options, &topic, round, created, &mut report).await?);
    }

    let mut two: Option<ForwardRun> = None;
    if options.scaling {
        let topic_2x = format!("{run}-topic-2x");
        let group_2x = format!("{run}-fwd-2x");
        let temp_2x = format!("{topic_2x}.drain");
        created.topics.extend([topic_2x.clone(), temp_2x.clone()]);
        created.groups.push(group_2x.clone());
        println!(
            "Kafka: RSS vs backlog, producing {} into '{topic_2x}' and forwarding it",
            2 * m
        );
        create_topic(&brokers, &topic_2x, KAFKA_PARTITIONS).await?;
        seed_topic(&brokers, &topic_2x, 2 * m).await?;
        let run2 = {
            let (brokers, options) = (Arc::clone(&brokers), Arc::clone(&options));
            blocking("forward", move || {
                forward_topic(
                    &brokers,
                    &options,
                    &topic_2x,
                    &group_2x,
                    2 * m,
                    mqdrain_binary(),
                    &temp_2x,
                )
            })
            .await?
        };
        report.row(
            format!(
                "mqdrain forward, 2x backlog -> {} partitions",
                KAFKA_PARTITIONS as usize * FACTOR
            ),
            run2.rates,
            Some(&run2.finished),
        );
        report.note(own_figure(&run2));
        two = Some(run2);
    }

    let ratios: Vec<f64> = rounds
        .iter()
        .map(|r| r.forward.rates.transfer_rate() / r.baseline.transfer_rate())
        .collect();
    let ratios_e2e: Vec<f64> = rounds
        .iter()
        .map(|r| r.forward.rates.end_to_end_rate() / r.baseline.end_to_end_rate())
        .collect();
    let ratio = median(&ratios);
    report.note(format!(
        "ratio forward/consume-only: {ratio:.2}x transfer, {:.2}x end-to-end{} (target >= {KAFKA_RATIO_TARGET}x: {})",
        median(&ratios_e2e),
        rounds_text(&ratios),
        verdict(ratio >= KAFKA_RATIO_TARGET)
    ));
    let pipe_ratios: Vec<f64> = rounds
        .iter()
        .map(|r| r.forward.rates.transfer_rate() / r.pipe.transfer_rate())
        .collect();
    let pipe_bound: Vec<f64> = rounds
        .iter()
        .map(|r| r.pipe.transfer_rate() / r.baseline.transfer_rate())
        .collect();
    report.note(format!(
        "ratio forward/reference pipe: {:.2}x transfer{}; the pipe itself reaches {:.2}x of consume-only, which bounds any forwarder on this broker",
        median(&pipe_ratios),
        rounds_text(&pipe_ratios),
        median(&pipe_bound)
    ));
    if options.compare_bin.is_some() {
        let ratios: Vec<f64> = rounds
            .iter()
            .filter_map(|r| {
                let other = r.compare.as_ref()?;
                Some(r.forward.rates.transfer_rate() / other.rates.transfer_rate())
            })
            .collect();
        report.note(format!(
            "ratio this build/--compare-bin: {:.2}x transfer{}",
            median(&ratios),
            rounds_text(&ratios)
        ));
    }
    let rss = rounds
        .iter()
        .map(|r| mib(r.forward.finished.peak_rss_kib))
        .fold(0.0, f64::max);
    let mut rss_line = format!("peak RSS of forward: {rss:.1} MiB at {m}");
    let mut worst = rss;
    if let Some(two) = &two {
        let rss2 = mib(two.finished.peak_rss_kib);
        worst = worst.max(rss2);
        let _ = write!(
            rss_line,
            ", {rss2:.1} MiB at {} ({:+.1}%)",
            2 * m,
            (rss2 / rss - 1.0) * 100.0
        );
    }
    let _ = write!(
        rss_line,
        " (target < {KAFKA_RSS_TARGET_MIB} MiB: {})",
        verdict(worst < KAFKA_RSS_TARGET_MIB)
    );
    report.note(rss_line);
    Ok(report)
}

async fn kafka_cleanup(brokers: &Brokers, created: &mut Created) -> Vec<String> {
    let mut problems = Vec::new();
    if created.topics.is_empty() && created.groups.is_empty() {
        return problems;
    }
    let admin = match kafka_admin(brokers) {
        Ok(admin) => admin,
        Err(error) => return vec![error],
    };
    let topics: Vec<String> = created.topics.drain(..).collect();
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    match admin.delete_topics(&names, &admin_options()).await {
        Ok(results) => {
            for result in results {
                match result {
                    Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                    Err((name, code)) => problems.push(format!("topic {name}: {code}")),
                }
            }
        }
        Err(error) => problems.push(format!("deleting topics: {error}")),
    }
    let groups: Vec<String> = created.groups.drain(..).collect();
    let names: Vec<&str> = groups.iter().map(String::as_str).collect();
    match admin.delete_groups(&names, &admin_options()).await {
        Ok(results) => {
            for result in results {
                match result {
                    Ok(_) | Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
                    Err((name, code)) => problems.push(format!("group {name}: {code}")),
                }
            }
        }
        Err(error) => problems.push(format!("deleting groups: {error}")),
    }
    problems
}

// ------------------------------------------------------------------ main

async fn bench(options: Options) -> Res<()> {
    let brokers = Arc::new(Brokers::from_env());
    brokers.check(&options).await?;
    let run = run_id();
    println!(
        "mqdrain drain bench, run '{run}': binary {}, load average {}",
        mqdrain_binary(),
        loadavg()
    );
    if !options.forward_args.is_empty() {
        println!(
            "extra forward arguments: {}",
            options.forward_args.join(" ")
        );
    }
    let options = Arc::new(options);
    let mut created = Created::default();
    let mut reports: Vec<(String, Res<Report>)> = Vec::new();

    if options.rabbit {
        let result = tokio::select! {
            result = rabbit_bench(&brokers, &options, &run, &mut created) => result,
            _ = tokio::signal::ctrl_c() => Err("interrupted".to_string()),
        };
        let problems = rabbit_cleanup(&brokers, &mut created).await;
        if !problems.is_empty() {
            eprintln!("RabbitMQ cleanup left: {}", problems.join("; "));
        }
        reports.push((
            format!(
                "RabbitMQ 3.x: {} persistent {RABBIT_PAYLOAD}-byte messages, durable classic queues, factor {FACTOR}",
                options.rabbit_messages
            ),
            result,
        ));
    }
    if options.kafka && !reports.iter().any(|(_, result)| result.is_err()) {
        let result = tokio::select! {
            result = kafka_bench(Arc::clone(&brokers), Arc::clone(&options), &run, &mut created) => result,
            _ = tokio::signal::ctrl_c() => Err("interrupted".to_string()),
        };
        let problems = kafka_cleanup(&brokers, &mut created).await;
        if !problems.is_empty() {
            eprintln!("Kafka cleanup left: {}", problems.join("; "));
        }
        reports.push((
            format!(
                "Kafka (nisshi): {} {KAFKA_PAYLOAD}-byte records, {KAFKA_PARTITIONS} partitions, factor {FACTOR}",
                options.kafka_messages
            ),
            result,
        ));
    }

    println!("\n=== results (load average now {}) ===", loadavg());
    let mut failed = Vec::new();
    for (title, result) in &reports {
        match result {
            Ok(report) => report.print(title),
            Err(error) => {
                println!("\n{title}\n  FAILED: {error}");
                failed.push(error.clone());
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|arg| arg == LAUNCHER) {
        launcher(&args[1..]);
    }
    let options = match parse_options() {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("drain bench: skipped (not started by `cargo bench`); run scripts/bench or `cargo bench --bench drain`");
            return;
        }
        Err(error) => {
            eprintln!("drain bench: {error}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("drain bench: cannot start the async runtime: {error}");
            std::process::exit(1);
        }
    };
    if let Err(error) = runtime.block_on(bench(options)) {
        eprintln!("drain bench: {error}");
        std::process::exit(1);
    }
}
