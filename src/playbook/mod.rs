//! YAML playbooks: the runbook's steps as a file that CI and on-call engineers run the same way.
//!
//! This module is the model, loading and validation: every problem is reported with the file's
//! line:column and what was expected, before anything touches a broker. `runner` executes a
//! loaded playbook through the same `ops` functions the subcommands call; `journal` records
//! finished steps and `resume` decides what `--resume` does with them; `junit` and `report` write the run's outcome.

pub mod condition;
pub mod journal;
pub mod junit;
pub mod report;
pub mod resume;
pub mod runner;
pub mod source;

use crate::endpoint::{self, Target};
use crate::error::Error;
use crate::ops::dlq::DlqReplaySpec;
use crate::ops::drain::{ExpandSpec, ForwardSpec, RestoreSpec, StopConsumersSpec, WatchSpec};
use crate::ops::inspect::InspectSpec;
use condition::Condition;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};
use source::{interpolate, join, Pos, Positions, Scope};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The operation keys a step may have, in the order the runbook uses them.
pub const OPERATIONS: &[&str] = &[
    "inspect",
    "stop-consumers",
    "expand",
    "forward",
    "watch",
    "restore",
    "dlq-replay",
    "stop-forward",
    "exec",
    "wait",
    "approve",
];
const STEP_KEYS: &[&str] = &["name", "timeout", "continue_on_error"];
const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "broker",
    "vars",
    "steps",
    "on_failure",
];
const BROKER_KEYS: &[&str] = &["url", "management_url", "client_config", "ca_file"];
/// `InspectSpec` does not deny unknown fields, so its options are checked against this list
/// (kept in sync by a unit test).
const INSPECT_KEYS: &[&str] = &["name", "group", "sample"];

/// A loaded, validated playbook with every `${...}` resolved.
#[derive(Debug, Clone, Serialize)]
pub struct Playbook {
    pub path: PathBuf,
    pub name: String,
    pub description: Option<String>,
    pub broker: BrokerSpec,
    pub vars: BTreeMap<String, String>,
    pub steps: Vec<Step>,
    pub on_failure: Vec<Step>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BrokerSpec {
    #[serde(serialize_with = "redacted")]
    pub url: Option<String>,
    #[serde(serialize_with = "redacted")]
    pub management_url: Option<String>,
    pub client_config: Vec<String>,
    pub ca_file: Option<String>,
}

/// Shows URLs without their passwords (`playbook check --output json`).
fn redacted<S: serde::Serializer>(url: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => serializer.serialize_str(&endpoint::redact_url(url)),
        None => serializer.serialize_none(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// 0-based position in `steps` (or `on_failure`).
    pub index: usize,
    pub name: String,
    pub operation: Operation,
    #[serde(with = "crate::ops::duration_text::option")]
    pub timeout: Option<Duration>,
    pub continue_on_error: bool,
    /// Where the step starts in the file.
    pub pos: Pos,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case", tag = "operation", content = "options")]
pub enum Operation {
    Inspect(InspectSpec),
    StopConsumers(StopConsumersSpec),
    Expand(ExpandSpec),
    Forward(ForwardStep),
    Watch(WatchSpec),
    Restore(RestoreSpec),
    DlqReplay(DlqReplaySpec),
    StopForward(StopForwardSpec),
    Exec(ExecSpec),
    Wait(WaitSpec),
    Approve(ApproveSpec),
}

impl Operation {
    pub fn key(&self) -> &'static str {
        match self {
            Operation::Inspect(_) => "inspect",
            Operation::StopConsumers(_) => "stop-consumers",
            Operation::Expand(_) => "expand",
            Operation::Forward(_) => "forward",
            Operation::Watch(_) => "watch",
            Operation::Restore(_) => "restore",
            Operation::DlqReplay(_) => "dlq-replay",
            Operation::StopForward(_) => "stop-forward",
            Operation::Exec(_) => "exec",
            Operation::Wait(_) => "wait",
            Operation::Approve(_) => "approve",
        }
    }

    /// The queue or topic the step works on, if it names one.
    pub fn subject(&self) -> Option<(&str, Option<&str>)> {
        match self {
            Operation::Inspect(spec) => Some((&spec.name, None)),
            Operation::StopConsumers(spec) => Some((&spec.name, None)),
            Operation::Expand(spec) => Some((&spec.name, spec.temp.as_deref())),
            Operation::Forward(step) => Some((&step.spec.name, step.spec.temp.as_deref())),
            Operation::Watch(spec) => Some((&spec.name, spec.temp.as_deref())),
            Operation::Restore(spec) => Some((&spec.name, spec.temp.as_deref())),
            Operation::Wait(spec) => Some((&spec.name, spec.temp.as_deref())),
            _ => None,
        }
    }

    /// Kafka: the consumer group and the temporary group the step names, if any.
    pub fn groups(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Operation::Inspect(spec) => (spec.group.as_deref(), None),
            Operation::StopConsumers(spec) => (spec.group.as_deref(), None),
            Operation::Expand(spec) => (spec.group.as_deref(), None),
            Operation::Forward(step) => (step.spec.group.as_deref(), None),
            Operation::Watch(spec) => (spec.group.as_deref(), spec.temp_group.as_deref()),
            Operation::Restore(spec) => (spec.group.as_deref(), spec.temp_group.as_deref()),
            Operation::Wait(spec) => (spec.group.as_deref(), spec.temp_group.as_deref()),
            _ => (None, None),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ForwardStep {
    #[serde(flatten)]
    pub spec: ForwardSpec,
    /// Runs as a task until a later `stop-forward` (or the end of the run) stops it.
    pub background: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopForwardSpec {
    /// The `name` of the background forward step to stop; may be left out when only one runs.
    #[serde(default)]
    pub forward: Option<String>,
}

fn default_exec_timeout() -> Duration {
    Duration::from_secs(120)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// Run with `sh -c`; the environment has MQDRAIN (this executable) and MQDRAIN_URL.
    pub command: String,
    #[serde(default = "default_exec_timeout", with = "crate::ops::duration_text")]
    pub timeout: Duration,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub expect_exit: i32,
}

fn default_wait_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_wait_samples() -> u32 {
    2
}
fn default_wait_settle() -> Duration {
    Duration::from_secs(6)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitSpec {
    /// Queue (RabbitMQ) or topic (Kafka) whose backlog the conditions look at.
    pub name: String,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub temp_group: Option<String>,
    #[serde(default)]
    pub temp: Option<String>,
    /// One condition or a list; all must hold.
    pub until: OneOrMany,
    #[serde(default = "default_wait_interval", with = "crate::ops::duration_text")]
    pub interval: Duration,
    /// Consecutive samples on which the conditions must hold (statistics lag; one lucky sample
    /// is not enough).
    #[serde(default = "default_wait_samples")]
    pub samples: u32,
    /// How long the conditions must hold without a break: management statistics refresh every
    /// 5 s and a queue declared moments ago can report a stale 0 (use 0s for Kafka, whose lag is
    /// exact).
    #[serde(default = "default_wait_settle", with = "crate::ops::duration_text")]
    pub settle: Duration,
    #[serde(default, with = "crate::ops::duration_text::option")]
    pub timeout: Option<Duration>,
    /// Parsed from `until` at load time.
    #[serde(skip)]
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(text) => vec![text.as_str()],
            OneOrMany::Many(list) => list.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproveSpec {
    pub message: String,
}

/// One problem in a playbook, at a place in its file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            // Not about a place in the file (it could not be read at all).
            return write!(f, "{}: {}", self.file, self.message);
        }
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Every problem found in a playbook; converts to a usage error (exit 2).
#[derive(Debug, Clone)]
pub struct Invalid {
    pub diagnostics: Vec<Diagnostic>,
}

impl From<Invalid> for Error {
    fn from(invalid: Invalid) -> Error {
        let count = invalid.diagnostics.len();
        let lines: Vec<String> = invalid
            .diagnostics
            .iter()
            .map(ToString::to_string)
            .collect();
        Error::usage(format!(
            "invalid playbook ({count} problem{}); fix {} and run `mqdrain playbook check` again:\n{}",
            if count == 1 { "" } else { "s" },
            if count == 1 { "it" } else { "them" },
            lines.join("\n")
        ))
    }
}

/// Where `${env.NAME}` looks: the process environment by default.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Reads and validates a playbook file, with `--var` overrides applied.
pub fn load(
    path: &Path,
    overrides: &[(String, String)],
    env: EnvLookup,
) -> Result<Playbook, Invalid> {
    let text = std::fs::read_to_string(path).map_err(|error| Invalid {
        diagnostics: vec![Diagnostic {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            message: format!("cannot read the playbook: {error}"),
        }],
    })?;
    parse(path, &text, overrides, env)
}

/// Validates playbook `text` (read from `path`, used in messages).
pub fn parse(
    path: &Path,
    text: &str,
    overrides: &[(String, String)],
    env: EnvLookup,
) -> Result<Playbook, Invalid> {
    let mut loader = Loader {
        file: path.display().to_string(),
        text,
        positions: Positions::scan(text),
        diagnostics: Vec::new(),
        vars: BTreeMap::new(),
        env,
    };
    let playbook = loader.playbook(path, overrides);
    match playbook {
        Some(playbook) if loader.diagnostics.is_empty() => Ok(playbook),
        _ => {
            loader
                .diagnostics
                .sort_by_key(|diagnostic| (diagnostic.line, diagnostic.column));
            Err(Invalid {
                diagnostics: loader.diagnostics,
            })
        }
    }
}

/// Parses `key=value` from `--var`.
pub fn parse_var(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.to_string()))
        }
        _ => Err(format!(
            "'{text}' is not key=value; e.g. --var queue=orders"
        )),
    }
}

impl Playbook {
    /// The broker the playbook names; without a `broker.url` the command line's is used.
    pub fn target(&self, fallback: &BrokerSpec) -> Result<Target, Error> {
        let (url, management_url, client_config, ca_file) = match &self.broker.url {
            Some(url) => (
                url.as_str(),
                self.broker.management_url.as_deref(),
                self.broker.client_config.as_slice(),
                self.broker.ca_file.as_deref(),
            ),
            None => (
                fallback.url.as_deref().ok_or_else(|| {
                    Error::usage(format!(
                        "playbook {} has no broker.url and none was given: add `broker: {{url: ...}}` or pass --url",
                        self.path.display()
                    ))
                })?,
                fallback.management_url.as_deref(),
                fallback.client_config.as_slice(),
                fallback.ca_file.as_deref(),
            ),
        };
        endpoint::parse_target(url, management_url, client_config, ca_file)
    }

    /// The queue or topic the playbook drains (the first step that names one) and the temporary
    /// prefix/topic a step gives for it.
    pub fn source(&self) -> Option<(&str, Option<&str>)> {
        let (name, _) = self
            .steps
            .iter()
            .find_map(|step| step.operation.subject())?;
        let temp = self
            .steps
            .iter()
            .find_map(|step| match step.operation.subject() {
                Some((subject, Some(temp))) if subject == name => Some(temp),
                _ => None,
            });
        Some((name, temp))
    }

    /// Kafka: the group and the temporary group the steps name for the queue/topic `name` (the
    /// first of each), so that the report can watch the same lag the steps work on.
    pub fn groups_of(&self, name: &str) -> (Option<&str>, Option<&str>) {
        let mut found = (None, None);
        for step in &self.steps {
            if step.operation.subject().map(|(subject, _)| subject) != Some(name) {
                continue;
            }
            let (group, temp_group) = step.operation.groups();
            found = (found.0.or(group), found.1.or(temp_group));
        }
        found
    }

    /// Every step, then every on_failure step.
    pub fn all_steps(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().chain(self.on_failure.iter())
    }
}

struct Loader<'a> {
    file: String,
    text: &'a str,
    positions: Positions,
    diagnostics: Vec<Diagnostic>,
    vars: BTreeMap<String, String>,
    env: EnvLookup<'a>,
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

impl Loader<'_> {
    fn error_at(&mut self, pos: Pos, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            message: message.into(),
        });
    }

    fn key_error(&mut self, path: &str, message: impl Into<String>) {
        let pos = self.positions.key(path);
        self.error_at(pos, message);
    }

    fn value_error(&mut self, path: &str, message: impl Into<String>) {
        let pos = self.positions.value(path);
        self.error_at(pos, message);
    }

    fn playbook(&mut self, path: &Path, overrides: &[(String, String)]) -> Option<Playbook> {
        let document: Value = match serde_yaml::from_str(self.text) {
            Ok(document) => document,
            Err(error) => {
                let pos = error
                    .location()
                    .map_or(Pos { line: 1, column: 1 }, |at| Pos {
                        line: at.line(),
                        column: at.column(),
                    });
                let message = error.to_string();
                let message = message
                    .rsplit_once(" at line ")
                    .map_or(message.as_str(), |(text, _)| text)
                    .to_string();
                self.error_at(pos, format!("not valid YAML: {message}"));
                return None;
            }
        };
        let Value::Mapping(top) = document else {
            self.error_at(
                Pos { line: 1, column: 1 },
                format!(
                    "expected a mapping with `name`, `broker`, `vars`, `steps` and `on_failure`, found {}",
                    describe(&document)
                ),
            );
            return None;
        };
        for key in top.keys() {
            let name = scalar_text(key).unwrap_or_default();
            if !TOP_KEYS.contains(&name.as_str()) {
                self.key_error(
                    &name,
                    format!(
                        "unknown top-level key `{name}`: expected one of {}",
                        TOP_KEYS.join(", ")
                    ),
                );
            }
        }
        self.load_vars(top.get("vars"), overrides);
        // A missing key has no place of its own: point at the mapping it belongs in (past any
        // leading comments).
        let top_pos = top
            .keys()
            .next()
            .and_then(scalar_text)
            .map_or(Pos { line: 1, column: 1 }, |first| {
                self.positions.key(&first)
            });
        let name = match top.get("name") {
            Some(value) => self.string("name", value),
            None => {
                self.error_at(
                    top_pos,
                    "missing required field `name` in the playbook's top-level mapping (it starts here): give the playbook a name, e.g. `name: drain orders`",
                );
                None
            }
        };
        let description = top
            .get("description")
            .and_then(|value| self.string("description", value));
        let broker = self.broker(top.get("broker"));
        let steps = match top.get("steps") {
            Some(value) => self.steps("steps", value),
            None => {
                self.error_at(
                    top_pos,
                    "missing required field `steps` in the playbook's top-level mapping (it starts here): a list of steps, e.g. `steps: [{inspect: {name: orders}}]`",
                );
                Vec::new()
            }
        };
        let on_failure = match top.get("on_failure") {
            Some(Value::Null) | None => Vec::new(),
            Some(value) => self.steps("on_failure", value),
        };
        self.cross_checks(&steps, &on_failure);
        Some(Playbook {
            path: path.to_path_buf(),
            name: name.unwrap_or_default(),
            description,
            broker,
            vars: self.vars.clone(),
            steps,
            on_failure,
        })
    }

    fn load_vars(&mut self, value: Option<&Value>, overrides: &[(String, String)]) {
        match value {
            None | Some(Value::Null) => {}
            Some(Value::Mapping(map)) => {
                for (key, value) in map {
                    let name = scalar_text(key).unwrap_or_default();
                    let path = join("vars", &name);
                    match scalar_text(value) {
                        Some(text) => {
                            self.vars.insert(name, text);
                        }
                        None if value.is_null() => {
                            self.vars.insert(name, String::new());
                        }
                        None => self.value_error(
                            &path,
                            format!(
                                "wrong type for variable `{name}`: expected a string, number or boolean, found {}",
                                describe(value)
                            ),
                        ),
                    }
                }
            }
            Some(other) => self.value_error(
                "vars",
                format!(
                    "wrong type for `vars`: expected a mapping of names to values, found {}",
                    describe(other)
                ),
            ),
        }
        for (key, value) in overrides {
            if !self.vars.contains_key(key) {
                let declared: Vec<&str> = self.vars.keys().map(String::as_str).collect();
                self.key_error(
                    "vars",
                    format!(
                        "--var {key}=...: the playbook declares no variable `{key}` (declared: {}); add it under `vars:` first",
                        if declared.is_empty() { "none".to_string() } else { declared.join(", ") }
                    ),
                );
                continue;
            }
            self.vars.insert(key.clone(), value.clone());
        }
        // Variables may use the environment (`${env.NAME}`), not each other.
        let names: Vec<String> = self.vars.keys().cloned().collect();
        let empty = BTreeMap::new();
        for name in names {
            let path = join("vars", &name);
            let Some(raw) = self.vars.get(&name).cloned() else {
                continue;
            };
            let scope = Scope {
                vars: &empty,
                env: self.env,
            };
            match interpolate(&raw, &scope) {
                Ok((text, _)) => {
                    self.vars.insert(name, text);
                }
                Err(error) => {
                    let pos = self.reference_pos(&path, &error.reference);
                    let message = if error.reference.starts_with("${vars.") {
                        format!(
                            "variable `{name}` refers to {}: variables may use `${{env.NAME}}` but not other variables",
                            error.reference
                        )
                    } else {
                        error.message
                    };
                    self.error_at(pos, message);
                }
            }
        }
    }

    /// The exact column of `reference` on its value's line, or the value's position.
    fn reference_pos(&self, path: &str, reference: &str) -> Pos {
        let pos = self.positions.value(path);
        let Some(line) = self.text.lines().nth(pos.line.saturating_sub(1)) else {
            return pos;
        };
        let from = source::byte_offset(line, pos.column);
        match line.get(from..).and_then(|rest| rest.find(reference)) {
            Some(found) => Pos {
                line: pos.line,
                column: source::char_column(line, from + found),
            },
            None => pos,
        }
    }

    /// Resolves `${...}` in every string below `value`; a string that is exactly one reference
    /// becomes a number or boolean when its text is one, so `factor: ${vars.factor}` works.
    fn resolve(&mut self, path: &str, value: &Value) -> Value {
        match value {
            Value::String(text) => {
                let scope = Scope {
                    vars: &self.vars,
                    env: self.env,
                };
                match interpolate(text, &scope) {
                    Ok((resolved, whole)) => {
                        if whole {
                            if let Ok(typed @ (Value::Number(_) | Value::Bool(_))) =
                                serde_yaml::from_str::<Value>(&resolved)
                            {
                                return typed;
                            }
                        }
                        Value::String(resolved)
                    }
                    Err(error) => {
                        let pos = self.reference_pos(path, &error.reference);
                        self.error_at(pos, error.message);
                        Value::String(text.clone())
                    }
                }
            }
            Value::Sequence(items) => Value::Sequence(
                items
                    .iter()
                    .enumerate()
                    .map(|(index, item)| self.resolve(&format!("{path}[{index}]"), item))
                    .collect(),
            ),
            Value::Mapping(map) => {
                let mut out = Mapping::new();
                for (key, item) in map {
                    let name = scalar_text(key).unwrap_or_default();
                    let resolved = self.resolve(&join(path, &name), item);
                    out.insert(key.clone(), resolved);
                }
                Value::Mapping(out)
            }
            other => other.clone(),
        }
    }

    fn string(&mut self, path: &str, value: &Value) -> Option<String> {
        match self.resolve(path, value) {
            Value::String(text) => Some(text),
            Value::Number(number) => Some(number.to_string()),
            Value::Bool(flag) => Some(flag.to_string()),
            other => {
                self.value_error(
                    path,
                    format!(
                        "wrong type for `{path}`: expected a string, found {}",
                        describe(&other)
                    ),
                );
                None
            }
        }
    }

    fn broker(&mut self, value: Option<&Value>) -> BrokerSpec {
        let mut broker = BrokerSpec::default();
        let map = match value {
            None | Some(Value::Null) => return broker,
            Some(Value::Mapping(map)) => map,
            Some(other) => {
                self.value_error(
                    "broker",
                    format!(
                        "wrong type for `broker`: expected a mapping with `url` (and optionally management_url, client_config, ca_file), found {}",
                        describe(other)
                    ),
                );
                return broker;
            }
        };
        for (key, value) in map {
            let name = scalar_text(key).unwrap_or_default();
            let path = join("broker", &name);
            match name.as_str() {
                "url" => broker.url = self.string(&path, value),
                "management_url" => broker.management_url = self.string(&path, value),
                "ca_file" => broker.ca_file = self.string(&path, value),
                "client_config" => match self.resolve(&path, value) {
                    Value::Sequence(items) => {
                        for (index, item) in items.iter().enumerate() {
                            match scalar_text(item) {
                                Some(text) if text.contains('=') => broker.client_config.push(text),
                                _ => self.value_error(
                                    &format!("{path}[{index}]"),
                                    "wrong client_config entry: expected a `key=value` string, e.g. `security.protocol=SASL_SSL`",
                                ),
                            }
                        }
                    }
                    other => self.value_error(
                        &path,
                        format!(
                            "wrong type for `broker.client_config`: expected a list of `key=value` strings, found {}",
                            describe(&other)
                        ),
                    ),
                },
                other => self.key_error(
                    &path,
                    format!(
                        "unknown broker option `{other}`: expected one of {}",
                        BROKER_KEYS.join(", ")
                    ),
                ),
            }
        }
        if let Some(url) = &broker.url {
            // Parsing only: nothing is contacted here.
            if let Err(error) = endpoint::parse_target(
                url,
                broker.management_url.as_deref(),
                &broker.client_config,
                broker.ca_file.as_deref(),
            ) {
                self.value_error("broker.url", format!("invalid broker: {error}"));
            }
        }
        broker
    }

    fn steps(&mut self, list: &str, value: &Value) -> Vec<Step> {
        let Value::Sequence(items) = value else {
            self.value_error(
                list,
                format!(
                    "wrong type for `{list}`: expected a list of steps (`- inspect: ...`), found {}",
                    describe(value)
                ),
            );
            return Vec::new();
        };
        if items.is_empty() && list == "steps" {
            self.value_error(list, "`steps` is empty: a playbook needs at least one step");
        }
        items
            .iter()
            .enumerate()
            .filter_map(|(index, item)| self.step(list, index, item))
            .collect()
    }

    fn step(&mut self, list: &str, index: usize, value: &Value) -> Option<Step> {
        let path = format!("{list}[{index}]");
        let pos = self.positions.key(&path);
        let Value::Mapping(map) = value else {
            self.error_at(
                pos,
                format!(
                    "step {} is {}: expected a mapping with one operation key ({})",
                    index + 1,
                    describe(value),
                    OPERATIONS.join(", ")
                ),
            );
            return None;
        };
        let mut operation: Option<(String, &Value)> = None;
        let mut name = None;
        let mut timeout = None;
        let mut continue_on_error = false;
        let mut failed = false;
        for (key, item) in map {
            let key = scalar_text(key).unwrap_or_default();
            let key_path = join(&path, &key);
            if OPERATIONS.contains(&key.as_str()) {
                if let Some((first, _)) = &operation {
                    self.key_error(
                        &key_path,
                        format!(
                            "step {} has a second operation `{key}` (it already has `{first}`): each step does exactly one thing; split it into two steps",
                            index + 1
                        ),
                    );
                    failed = true;
                } else {
                    operation = Some((key, item));
                }
                continue;
            }
            match key.as_str() {
                "name" => name = self.string(&key_path, item),
                "timeout" => match self.string(&key_path, item) {
                    Some(text) => match humantime::parse_duration(&text) {
                        Ok(duration) => timeout = Some(duration),
                        Err(error) => self.value_error(
                            &key_path,
                            format!(
                                "invalid `timeout` '{text}': {error}; expected a duration like 30s, 5m, 1h"
                            ),
                        ),
                    },
                    None => failed = true,
                },
                "continue_on_error" => match self.resolve(&key_path, item) {
                    Value::Bool(flag) => continue_on_error = flag,
                    other => self.value_error(
                        &key_path,
                        format!(
                            "wrong type for `continue_on_error`: expected true or false, found {}",
                            describe(&other)
                        ),
                    ),
                },
                "background" => self.key_error(
                    &key_path,
                    "`background` belongs inside the forward options: `forward: {name: ..., background: true}`",
                ),
                other => {
                    let suggestion = closest(other, OPERATIONS)
                        .map(|op| format!(" (did you mean `{op}`?)"))
                        .unwrap_or_default();
                    self.key_error(
                        &key_path,
                        format!(
                            "unknown step key `{other}`{suggestion}: expected one operation ({}) and optionally {}",
                            OPERATIONS.join(", "),
                            STEP_KEYS.join(", ")
                        ),
                    );
                    failed = true;
                }
            }
        }
        let Some((op, options)) = operation else {
            if !failed {
                self.error_at(
                    pos,
                    format!(
                        "step {} has no operation: expected one of {}",
                        index + 1,
                        OPERATIONS.join(", ")
                    ),
                );
            }
            return None;
        };
        let op_path = join(&path, &op);
        let operation = self.operation(&op, &op_path, options)?;
        let name = name.unwrap_or_else(|| default_name(index, &operation));
        Some(Step {
            index,
            name,
            operation,
            timeout,
            continue_on_error,
            pos,
        })
    }

    fn operation(&mut self, op: &str, path: &str, options: &Value) -> Option<Operation> {
        let mut resolved = match options {
            // `stop-forward:` with nothing after it means "the only background forward".
            Value::Null if op == "stop-forward" => Value::Mapping(Mapping::new()),
            Value::Mapping(_) => self.resolve(path, options),
            other => {
                self.value_error(
                    path,
                    format!(
                        "wrong type for `{op}`: expected a mapping of its options (e.g. `{op}: {{name: orders}}`), found {}",
                        describe(other)
                    ),
                );
                return None;
            }
        };
        Some(match op {
            "inspect" => {
                let mut unknown = Vec::new();
                if let Value::Mapping(map) = &resolved {
                    for key in map.keys() {
                        let key = scalar_text(key).unwrap_or_default();
                        if !INSPECT_KEYS.contains(&key.as_str()) {
                            let suggestion = closest(&key, INSPECT_KEYS)
                                .map(|option| format!(" (did you mean `{option}`?)"))
                                .unwrap_or_default();
                            self.key_error(
                                &join(path, &key),
                                format!(
                                    "unknown option `{key}` for `inspect`{suggestion}: expected one of {}",
                                    INSPECT_KEYS.join(", ")
                                ),
                            );
                            unknown.push(key);
                        }
                    }
                }
                // The other options are still checked.
                if let Value::Mapping(map) = &mut resolved {
                    for key in &unknown {
                        map.remove(key.as_str());
                    }
                }
                let spec = self.typed(op, path, &resolved)?;
                if !unknown.is_empty() {
                    return None;
                }
                Operation::Inspect(spec)
            }
            "stop-consumers" => Operation::StopConsumers(self.typed(op, path, &resolved)?),
            "expand" => {
                let spec: ExpandSpec = self.typed(op, path, &resolved)?;
                if let Err(error) = spec.check_factor() {
                    self.value_error(&join(path, "factor"), error.to_string());
                }
                Operation::Expand(spec)
            }
            "forward" => {
                let mut background = Some(false);
                if let Value::Mapping(map) = &mut resolved {
                    if let Some(flag) = map.remove("background") {
                        match flag {
                            Value::Bool(flag) => background = Some(flag),
                            other => {
                                self.value_error(
                                    &join(path, "background"),
                                    format!(
                                        "wrong type for `background`: expected true or false, found {}",
                                        describe(&other)
                                    ),
                                );
                                background = None;
                            }
                        }
                    }
                }
                // The other options are checked even when `background` was wrong.
                let spec: ForwardSpec = self.typed(op, path, &resolved)?;
                let background = background?;
                if let Err(error) = crate::broker::rabbitmq::drain::validate_window(&spec) {
                    self.error_at(self.positions.key(path), error.to_string());
                }
                Operation::Forward(ForwardStep { spec, background })
            }
            "watch" => Operation::Watch(self.typed(op, path, &resolved)?),
            "restore" => Operation::Restore(self.typed(op, path, &resolved)?),
            "dlq-replay" => {
                let spec: DlqReplaySpec = self.typed(op, path, &resolved)?;
                if let Err(error) = crate::ops::dlq::validate_replay(&spec) {
                    self.error_at(self.positions.key(path), error.to_string());
                }
                Operation::DlqReplay(spec)
            }
            "stop-forward" => Operation::StopForward(self.typed(op, path, &resolved)?),
            "exec" => Operation::Exec(self.typed(op, path, &resolved)?),
            "approve" => Operation::Approve(self.typed(op, path, &resolved)?),
            "wait" => {
                let mut spec: WaitSpec = self.typed(op, path, &resolved)?;
                let until = join(path, "until");
                let items = spec.until.items();
                if items.is_empty() {
                    self.value_error(
                        &until,
                        "`until` is empty: give at least one condition, e.g. `source.depth == 0`",
                    );
                }
                let many = matches!(spec.until, OneOrMany::Many(_));
                let mut conditions = Vec::new();
                for (index, item) in items.iter().enumerate() {
                    match Condition::parse(item) {
                        Ok(condition) => conditions.push(condition),
                        Err(message) => {
                            let at = if many {
                                format!("{until}[{index}]")
                            } else {
                                until.clone()
                            };
                            self.value_error(&at, message);
                        }
                    }
                }
                if spec.samples == 0 {
                    self.value_error(&join(path, "samples"), "`samples` must be at least 1");
                }
                spec.conditions = conditions;
                Operation::Wait(spec)
            }
            _ => return None,
        })
    }

    /// Deserializes options into a spec type through YAML text, so plain scalars convert by the
    /// target type (`8` is a number for `factor` and a string for `name`) and the error's line
    /// in that text tells which option was wrong.
    /// serde stops at the first problem, so each option it blames is reported, taken out, and
    /// the rest deserialized again: every bad option of a step is reported in one go.
    fn typed<T: DeserializeOwned>(&mut self, op: &str, path: &str, value: &Value) -> Option<T> {
        let mut value = value.clone();
        let mut reported: Vec<String> = Vec::new();
        loop {
            let text = match serde_yaml::to_string(&value) {
                Ok(text) => text,
                Err(error) => {
                    self.key_error(path, format!("cannot read the `{op}` options: {error}"));
                    return None;
                }
            };
            let error = match serde_yaml::from_str::<T>(&text) {
                // Options were taken out: the spec is not what the file says.
                Ok(spec) => return reported.is_empty().then_some(spec),
                Err(error) => error,
            };
            // An error of a custom deserializer (a duration) names no option: the culprit is the
            // first option whose removal changes the error (serde stops at the first bad value
            // and checks for missing options only at the end).
            let culprit = || {
                let Value::Mapping(map) = &value else {
                    return None;
                };
                map.keys().filter_map(scalar_text).find(|key| {
                    let mut without = map.clone();
                    without.remove(key.as_str());
                    let again = serde_yaml::to_string(&without).ok().map(|text| {
                        serde_yaml::from_str::<T>(&text)
                            .err()
                            .map(|e| e.to_string())
                    });
                    again != Some(Some(error.to_string()))
                })
            };
            let option = self.option_error(op, path, &error, &reported, culprit)?;
            let taken = match &mut value {
                Value::Mapping(map) => map.remove(option.as_str()).is_some(),
                _ => false,
            };
            if !taken {
                return None;
            }
            reported.push(option);
        }
    }

    /// Reports one deserialization error of `op`'s options (serialized as `text`) and returns
    /// the top-level option it blames, or `None` when there is nothing to take out.
    fn option_error(
        &mut self,
        op: &str,
        path: &str,
        error: &serde_yaml::Error,
        reported: &[String],
        culprit: impl FnOnce() -> Option<String>,
    ) -> Option<String> {
        let message = error.to_string();
        let message = message
            .rsplit_once(" at line ")
            .map_or(message.as_str(), |(text, _)| text)
            .to_string();
        // serde_yaml prefixes the option path ("factor: invalid type ...").
        let (field, detail) = match message.split_once(": ") {
            Some((field, detail)) if !field.contains(' ') && !field.is_empty() && field != "." => {
                (Some(field.to_string()), detail.to_string())
            }
            _ => (None, message.clone()),
        };
        if let Some(unknown) = backticked(&detail, "unknown field `") {
            let expected = detail
                .split_once(", expected ")
                .map(|(_, expected)| expected.to_string())
                .unwrap_or_default();
            let suggestion = closest(&unknown, &all_backticked(&expected))
                .map(|option| format!(" (did you mean `{option}`?)"))
                .unwrap_or_default();
            self.key_error(
                &join(path, &unknown),
                format!("unknown option `{unknown}` for `{op}`{suggestion}: expected {expected}"),
            );
            Some(unknown)
        } else if let Some(missing) = backticked(&detail, "missing field `") {
            // Missing because it was taken out after its own error: already said.
            if !reported.contains(&missing) {
                self.key_error(
                    path,
                    format!("missing required option `{missing}` for `{op}`"),
                );
            }
            None
        } else if let Some(field) = field.or_else(culprit) {
            let top = field
                .split(['.', '['])
                .next()
                .unwrap_or(field.as_str())
                .to_string();
            self.value_error(
                &join(path, &field),
                format!(
                    "wrong value for `{op}` option `{top}`: {}",
                    plain_types(&detail)
                ),
            );
            Some(top)
        } else {
            self.key_error(path, format!("invalid `{op}` options: {detail}"));
            None
        }
    }

    fn cross_checks(&mut self, steps: &[Step], on_failure: &[Step]) {
        for (list, group) in [("steps", steps), ("on_failure", on_failure)] {
            let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
            for step in group {
                if let Some(first) = seen.insert(&step.name, step.index) {
                    self.key_error(
                        &format!("{list}[{}].name", step.index),
                        format!(
                            "duplicate step name `{}` (also step {}): names identify steps in the run journal; make them unique",
                            step.name,
                            first + 1
                        ),
                    );
                }
            }
        }
        // A stop-forward must name a background forward that runs before it.
        let mut running: Vec<&str> = Vec::new();
        for step in steps {
            match &step.operation {
                Operation::Forward(forward) if forward.background => running.push(&step.name),
                Operation::StopForward(spec) => {
                    let path = format!("steps[{}].stop-forward", step.index);
                    match &spec.forward {
                        Some(name) => {
                            if let Some(at) = running.iter().position(|n| n == name) {
                                running.remove(at);
                            } else {
                                self.value_error(
                                    &join(&path, "forward"),
                                    format!(
                                        "stop-forward names `{name}`, but no background forward step of that name runs before it (running: {})",
                                        if running.is_empty() { "none".to_string() } else { running.join(", ") }
                                    ),
                                );
                            }
                        }
                        None if running.len() == 1 => {
                            running.clear();
                        }
                        None => self.key_error(
                            &path,
                            if running.is_empty() {
                                "stop-forward has no background forward to stop: add `background: true` to an earlier forward step".to_string()
                            } else {
                                format!(
                                    "stop-forward must name which background forward to stop (`forward: <step name>`): running are {}",
                                    running.join(", ")
                                )
                            },
                        ),
                    }
                }
                _ => {}
            }
        }
        for step in on_failure {
            if let Operation::Forward(forward) = &step.operation {
                if forward.background {
                    self.key_error(
                        &format!("on_failure[{}].forward", step.index),
                        "a background forward in on_failure would never be stopped: remove `background`",
                    );
                }
            }
            if matches!(step.operation, Operation::StopForward(_)) {
                self.key_error(
                    &format!("on_failure[{}].stop-forward", step.index),
                    "stop-forward is not needed in on_failure: background forwards are stopped before on_failure runs",
                );
            }
        }
    }
}

/// serde names Rust types ("expected usize"); say what to write instead.
fn plain_types(detail: &str) -> String {
    let mut text = detail.to_string();
    for (rust, plain) in [
        ("expected usize", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u16", "expected a whole number up to 65535"),
        ("expected i32", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ] {
        text = text.replace(rust, plain);
    }
    text
}

fn default_name(index: usize, operation: &Operation) -> String {
    match operation.subject() {
        Some((subject, _)) => format!("{} {} {subject}", index + 1, operation.key()),
        None => format!("{} {}", index + 1, operation.key()),
    }
}

fn backticked(text: &str, prefix: &str) -> Option<String> {
    let start = text.find(prefix)? + prefix.len();
    let end = text[start..].find('`')? + start;
    Some(text[start..end].to_string())
}

fn all_backticked(text: &str) -> Vec<String> {
    text.split('`')
        .enumerate()
        .filter(|(index, _)| index % 2 == 1)
        .map(|(_, part)| part.to_string())
        .collect()
}

/// The candidate within two edits of `word`, for "did you mean" hints.
fn closest<S: AsRef<str>>(word: &str, candidates: &[S]) -> Option<String> {
    candidates
        .iter()
        .map(|candidate| (edit_distance(word, candidate.as_ref()), candidate.as_ref()))
        .filter(|(distance, _)| *distance <= 2)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate.to_string())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = if ca == *cb {
                previous
            } else {
                1 + previous.min(row[j]).min(current)
            };
            previous = current;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn check(text: &str) -> Result<Playbook, Vec<Diagnostic>> {
        parse(Path::new("p.yaml"), text, &[], &no_env).map_err(|invalid| invalid.diagnostics)
    }

    #[test]
    fn inspect_keys_match_the_spec() {
        let spec = InspectSpec {
            name: "q".into(),
            group: None,
            sample: Duration::from_secs(1),
        };
        let value = serde_json::to_value(spec).unwrap();
        let mut keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut expected = INSPECT_KEYS.to_vec();
        expected.sort_unstable();
        assert_eq!(keys, expected);
    }

    #[test]
    fn typed_interpolation_and_defaults() {
        let playbook = check(
            "name: t\nvars:\n  q: orders\n  n: 3\n  cmd: 'false'\nsteps:\n  - expand:\n      name: ${vars.q}\n      factor: ${vars.n}\n  - exec:\n      command: ${vars.cmd}\n  - forward: {name: '${vars.q}', background: true}\n  - stop-forward:\n",
        )
        .unwrap();
        let Operation::Expand(spec) = &playbook.steps[0].operation else {
            panic!()
        };
        assert_eq!(spec.name, "orders");
        assert_eq!(spec.factor, crate::ops::drain::Factor::Count(3));
        let Operation::Exec(exec) = &playbook.steps[1].operation else {
            panic!()
        };
        assert_eq!(exec.command, "false");
        assert_eq!(playbook.steps[0].name, "1 expand orders");
        let Operation::Forward(forward) = &playbook.steps[2].operation else {
            panic!()
        };
        assert!(forward.background);
    }

    #[test]
    fn errors_point_at_the_offending_text() {
        let errors = check(
            "name: t\nsteps:\n  - expand:\n      name: q\n      factor: lots\n  - exapnd: {}\n  - restore:\n      name: q\n      colour: red\n  - expand:\n      factor: 2\n  - inspect:\n      name: ${vars.nope}\n",
        )
        .unwrap_err();
        let found: Vec<(usize, usize, &str)> = errors
            .iter()
            .map(|d| (d.line, d.column, d.message.as_str()))
            .collect();
        assert_eq!(found.len(), 5, "{found:#?}");
        assert_eq!((found[0].0, found[0].1), (5, 15), "{found:#?}");
        assert!(found[0].2.contains("factor"), "{found:#?}");
        assert_eq!((found[1].0, found[1].1), (6, 5));
        assert!(found[1].2.contains("did you mean `expand`"), "{found:#?}");
        assert_eq!((found[2].0, found[2].1), (9, 7));
        assert!(found[2].2.contains("unknown option `colour`"));
        assert_eq!((found[3].0, found[3].1), (10, 5));
        assert!(found[3].2.contains("missing required option `name`"));
        assert_eq!((found[4].0, found[4].1), (13, 13));
        assert!(found[4].2.contains("undefined variable"));
    }

    #[test]
    fn cross_step_checks() {
        let errors = check(
            "name: t\nsteps:\n  - name: a\n    exec: {command: x}\n  - name: a\n    exec: {command: y}\n  - stop-forward:\n  - forward: {name: q, background: true}\n  - stop-forward: {forward: nope}\n  - wait: {name: q, until: [source.depth == 0, 'temporary.lag < x']}\n",
        )
        .unwrap_err();
        let found: Vec<(usize, usize, &str)> = errors
            .iter()
            .map(|d| (d.line, d.column, d.message.as_str()))
            .collect();
        assert_eq!(found.len(), 4, "{found:#?}");
        assert_eq!((found[0].0, found[0].1), (5, 5), "{found:#?}");
        assert!(found[0].2.contains("duplicate step name `a`"));
        assert_eq!((found[1].0, found[1].1), (7, 5));
        assert!(found[1].2.contains("no background forward to stop"));
        assert_eq!((found[2].0, found[2].1), (9, 29));
        assert!(found[2]
            .2
            .contains("no background forward step of that name"));
        // Entries of single-line flow collections have their own positions.
        assert_eq!((found[3].0, found[3].1), (10, 48), "{found:#?}");
        assert!(found[3].2.contains("is not a whole number"));
    }

    #[test]
    fn env_defaults_and_overrides() {
        let env = |name: &str| (name == "QUEUE").then(|| "from-env".to_string());
        let text = "name: t\nvars:\n  q: ${env.QUEUE}\n  r: ${env.NOPE:-fallback}\nsteps:\n  - inspect: {name: '${vars.q}-${vars.r}'}\n";
        let playbook = parse(Path::new("p.yaml"), text, &[], &env).unwrap();
        let Operation::Inspect(spec) = &playbook.steps[0].operation else {
            panic!()
        };
        assert_eq!(spec.name, "from-env-fallback");
        let overridden = parse(
            Path::new("p.yaml"),
            text,
            &[("r".to_string(), "cli".to_string())],
            &env,
        )
        .unwrap();
        let Operation::Inspect(spec) = &overridden.steps[0].operation else {
            panic!()
        };
        assert_eq!(spec.name, "from-env-cli");
        let errors = parse(
            Path::new("p.yaml"),
            "name: t\nvars:\n  q: ${env.MISSING}\nsteps:\n  - inspect: {name: q}\n",
            &[],
            &env,
        )
        .unwrap_err()
        .diagnostics;
        assert_eq!((errors[0].line, errors[0].column), (3, 6));
        assert!(errors[0].message.contains("MISSING is not set"));
    }
}
