//! The run journal: which steps of a playbook finished, and how, written after every step so that
//! `--resume` can continue a run that failed or was killed.

use super::runner::StepOutcome;
use super::Step;
use crate::error::{Error, Result};
use crate::ops::partition::murmur2;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const VERSION: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Journal {
    pub version: u32,
    pub playbook: String,
    pub name: String,
    /// Every main step as it was when the journal was written, to refuse resuming a playbook
    /// that changed.
    pub fingerprint: Vec<StepPrint>,
    pub status: RunStatus,
    pub started_at: f64,
    pub updated_at: f64,
    pub steps: Vec<Entry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub index: usize,
    pub name: String,
    pub operation: String,
    pub outcome: StepOutcome,
    pub started_at: f64,
    pub finished_at: f64,
    #[serde(default)]
    pub message: Option<String>,
}

/// One step as the journal remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepPrint {
    pub operation: String,
    pub name: String,
    /// A hash of the resolved settings (variables substituted, timeout, continue_on_error): a
    /// changed playbook or `--var` shows without the journal keeping commands or URLs, which may
    /// hold secrets.
    pub settings: String,
}

impl StepPrint {
    pub fn of(step: &Step) -> StepPrint {
        let settings = serde_json::json!({
            "operation": step.operation,
            "timeout": step.timeout.map(|timeout| timeout.as_secs_f64()),
            "continue_on_error": step.continue_on_error,
        })
        .to_string();
        StepPrint {
            operation: step.operation.key().to_string(),
            name: step.name.clone(),
            // Any stable hash does; this one is at hand. Field order is the structs' own, so the
            // text is stable for equal settings.
            settings: format!("{:08x}", murmur2(settings.as_bytes())),
        }
    }
}

/// Default journal path: `<playbook>.state.json` next to the playbook.
pub fn default_path(playbook: &Path) -> PathBuf {
    let mut name = playbook
        .file_name()
        .map(|name| name.to_os_string())
        .unwrap_or_default();
    name.push(".state.json");
    playbook.with_file_name(name)
}

impl Journal {
    pub fn load(path: &Path) -> Result<Option<Journal>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(Error::usage(format!(
                    "cannot read the run journal {}: {error}",
                    path.display()
                )))
            }
        };
        let journal: Journal = serde_json::from_str(&text).map_err(|error| {
            Error::usage(format!(
                "the run journal {} is not readable ({error}); delete it to start the playbook from the beginning",
                path.display()
            ))
        })?;
        if journal.version != VERSION {
            return Err(Error::usage(format!(
                "the run journal {} has version {}, this mqdrain writes {VERSION}; delete it to start over",
                path.display(),
                journal.version
            )));
        }
        Ok(Some(journal))
    }

    /// Writes through a temporary file and a rename, so a kill never leaves half a journal.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|error| Error::Broker(format!("cannot encode the run journal: {error}")))?;
        let mut temporary = path.as_os_str().to_os_string();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        std::fs::write(&temporary, text)
            .and_then(|()| std::fs::rename(&temporary, path))
            .map_err(|error| {
                Error::Broker(format!(
                    "cannot write the run journal {}: {error}; pass --state FILE with a writable path",
                    path.display()
                ))
            })
    }

    /// The latest entry for step `index` (a resumed run appends new entries).
    pub fn entry(&self, index: usize) -> Option<&Entry> {
        self.steps.iter().rev().find(|entry| entry.index == index)
    }

    /// Whether step `index` finished: it succeeded, or failed with `continue_on_error` and the
    /// run went past it.
    pub fn finished(&self, index: usize) -> bool {
        self.entry(index).is_some_and(|entry| {
            matches!(
                entry.outcome,
                StepOutcome::Ok | StepOutcome::FailedContinued
            )
        })
    }

    /// Whether the playbook, now `prints`, can continue this journal's run: the same steps in the
    /// same order, and every finished step with the settings it ran with. A step that did not
    /// finish may change: that is how a failed step is fixed before resuming. `Ok` lists the
    /// steps that run with changed settings.
    pub fn resumable(&self, prints: &[StepPrint], path: &Path) -> Result<Vec<String>> {
        let describe = |print: Option<&StepPrint>| {
            print.map_or("(no step)".to_string(), |print| {
                format!("{} '{}'", print.operation, print.name)
            })
        };
        let length = self.fingerprint.len().max(prints.len());
        let mut changed = Vec::new();
        for index in 0..length {
            let (before, now) = (self.fingerprint.get(index), prints.get(index));
            let same_step = matches!((before, now), (Some(a), Some(b)) if a.operation == b.operation && a.name == b.name);
            if !same_step {
                return Err(Error::usage(format!(
                    "cannot resume: the playbook's steps changed since the journal {} was written (step {} was {}, now {}); undo the change, or delete the journal to start over",
                    path.display(),
                    index + 1,
                    describe(before),
                    describe(now),
                )));
            }
            if before.map(|b| &b.settings) == now.map(|n| &n.settings) {
                continue;
            }
            let name = describe(now);
            if self.finished(index) {
                return Err(Error::usage(format!(
                    "cannot resume: step {} {name} finished in the earlier run with other settings than the playbook now resolves to (the file or a --var changed); resume with the same file and --var values, or delete the journal {} to start over",
                    index + 1,
                    path.display()
                )));
            }
            changed.push(format!(
                "step {} {name} did not finish in the earlier run and runs with its changed settings",
                index + 1
            ));
        }
        Ok(changed)
    }

    pub fn record(&mut self, entry: Entry) {
        self.updated_at = entry.finished_at;
        self.steps.retain(|existing| existing.index != entry.index);
        self.steps.push(entry);
        self.steps.sort_by_key(|entry| entry.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_path_sits_next_to_the_playbook() {
        assert_eq!(
            default_path(Path::new("playbooks/drain.yaml")),
            PathBuf::from("playbooks/drain.yaml.state.json")
        );
    }

    #[test]
    fn round_trips_and_keeps_one_entry_per_step() {
        let dir = std::env::temp_dir().join(format!("mqdrain-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("j.json");
        let mut journal = Journal {
            version: VERSION,
            playbook: "p.yaml".into(),
            name: "p".into(),
            fingerprint: Vec::new(),
            status: RunStatus::Running,
            started_at: 1.0,
            updated_at: 1.0,
            steps: Vec::new(),
        };
        for outcome in [StepOutcome::Failed, StepOutcome::Ok] {
            journal.record(Entry {
                index: 0,
                name: "a".into(),
                operation: "expand".into(),
                outcome,
                started_at: 2.0,
                finished_at: 3.0,
                message: None,
            });
        }
        journal.save(&path).unwrap();
        let loaded = Journal::load(&path).unwrap().unwrap();
        assert_eq!(loaded.steps.len(), 1);
        assert_eq!(loaded.entry(0).unwrap().outcome, StepOutcome::Ok);
        assert!(loaded.finished(0));
        assert!(!loaded.finished(1));
        assert!(Journal::load(&dir.join("none.json")).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn resuming_needs_the_same_steps_and_finished_settings() {
        let print = |name: &str, settings: &str| StepPrint {
            operation: "exec".into(),
            name: name.into(),
            settings: settings.into(),
        };
        let mut journal = Journal {
            version: VERSION,
            playbook: "p.yaml".into(),
            name: "p".into(),
            fingerprint: vec![print("a", "1"), print("b", "2")],
            status: RunStatus::Failed,
            started_at: 1.0,
            updated_at: 1.0,
            steps: Vec::new(),
        };
        journal.record(Entry {
            index: 0,
            name: "a".into(),
            operation: "exec".into(),
            outcome: StepOutcome::Ok,
            started_at: 1.0,
            finished_at: 2.0,
            message: None,
        });
        let path = Path::new("j.json");
        assert!(journal
            .resumable(&[print("a", "1"), print("b", "2")], path)
            .unwrap()
            .is_empty());
        // The unfinished step may change (the fix for its failure).
        let notes = journal
            .resumable(&[print("a", "1"), print("b", "3")], path)
            .unwrap();
        assert!(notes[0].contains("step 2 exec 'b'"), "{notes:?}");
        // The finished one may not.
        let error = journal
            .resumable(&[print("a", "9"), print("b", "2")], path)
            .unwrap_err();
        assert_eq!(error.exit_code(), crate::error::exit::USAGE);
        assert!(
            error.to_string().contains("step 1 exec 'a' finished"),
            "{error}"
        );
        let error = journal.resumable(&[print("a", "1")], path).unwrap_err();
        assert!(error.to_string().contains("now (no step)"), "{error}");
    }
}
