//! What `--resume` does with each step of a run that stopped part-way, decided before the first
//! step runs from the journal's list of finished steps.
//!
//! One rule for every playbook: a finished step is never repeated. What it established
//! (stop-consumers: the consumers are gone; expand: the temporary topology exists) is re-verified
//! only when a step that runs now relies on it and no finished step since may have changed it on
//! purpose (restore deletes the temporary topology and restarts consumers; an `exec` is the
//! operator's own command, which typically starts or stops applications). Finished inspections,
//! gates and approvals are observations of the earlier run, not state: the steps they guarded
//! already ran, so they are not repeated either. A background forward whose stop-forward did not
//! finish died with the earlier run and is started again (it only moves what is still there).

use super::{Operation, Playbook, Step};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumePlan {
    Run,
    /// Re-check what the finished step established without repeating its action; the text
    /// names the step that relies on it.
    Verify(String),
    Skip(String),
}

/// State a step leaves behind that later steps rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fact {
    /// The original consumers of the queue (members of the group) are gone.
    ConsumersStopped,
    /// The temporary queues (topic) exist.
    Temporary,
}

impl Fact {
    fn describe(self, subject: &str) -> String {
        match self {
            Fact::ConsumersStopped => format!("the consumers of '{subject}' are stopped"),
            Fact::Temporary => format!("the temporary topology of '{subject}' exists"),
        }
    }
}

fn establishes(operation: &Operation) -> Option<(Fact, &str)> {
    match operation {
        Operation::StopConsumers(spec) => Some((Fact::ConsumersStopped, &spec.name)),
        Operation::Expand(spec) => Some((Fact::Temporary, &spec.name)),
        _ => None,
    }
}

/// Whether running `operation` may have changed `fact` about `subject` on purpose.
fn undoes(operation: &Operation, fact: Fact, subject: &str) -> bool {
    match (operation, fact) {
        (Operation::Restore(spec), Fact::Temporary) => spec.name == subject,
        (Operation::Restore(spec), Fact::ConsumersStopped) => {
            spec.name == subject && spec.exec.is_some()
        }
        // The operator's commands scale applications; which ones, only they know.
        (Operation::Exec(_), Fact::ConsumersStopped) => true,
        _ => false,
    }
}

/// What a step relies on when it runs.
fn requires(operation: &Operation) -> Vec<(Fact, &str)> {
    match operation {
        // The forwarder should be the backlog's only consumer, and it publishes into the
        // temporary topology (unless given explicit targets).
        Operation::Forward(forward) => {
            let name = forward.spec.name.as_str();
            let mut facts = vec![(Fact::ConsumersStopped, name)];
            if forward.spec.to.is_empty() {
                facts.push((Fact::Temporary, name));
            }
            facts
        }
        _ => Vec::new(),
    }
}

/// Whether a later finished stop-forward stopped the background forward `step`.
fn stopped(playbook: &Playbook, step: &Step, finished: &dyn Fn(usize) -> bool) -> bool {
    playbook.steps.iter().any(|later| {
        later.index > step.index
            && finished(later.index)
            && match &later.operation {
                Operation::StopForward(spec) => match &spec.forward {
                    Some(name) => *name == step.name,
                    // Without a name it stops the only background forward (checked at load).
                    None => true,
                },
                _ => false,
            }
    })
}

/// The plan for every main step, and warnings about state that cannot be re-verified.
pub fn plan(
    playbook: &Playbook,
    finished: &dyn Fn(usize) -> bool,
) -> (Vec<ResumePlan>, Vec<String>) {
    let steps = &playbook.steps;
    let mut plans: Vec<ResumePlan> = steps
        .iter()
        .map(|step| {
            if !finished(step.index) {
                return ResumePlan::Run;
            }
            match &step.operation {
                Operation::Forward(forward)
                    if forward.background && !stopped(playbook, step, finished) =>
                {
                    ResumePlan::Run
                }
                Operation::Forward(_) => ResumePlan::Skip(
                    "finished in an earlier run; a forward is never repeated".into(),
                ),
                Operation::DlqReplay(_) => ResumePlan::Skip(
                    // A second replay would send what died again since: a new decision.
                    "finished in an earlier run; a replay is never repeated".into(),
                ),
                Operation::Inspect(_)
                | Operation::Watch(_)
                | Operation::Wait(_)
                | Operation::Approve(_) => ResumePlan::Skip(
                    "finished in an earlier run; the steps it guarded already ran".into(),
                ),
                _ => ResumePlan::Skip("finished in an earlier run".into()),
            }
        })
        .collect();
    let mut warnings = Vec::new();
    let running: Vec<&Step> = steps
        .iter()
        .filter(|step| plans[step.index] == ResumePlan::Run)
        .collect();
    for runner in running {
        for (fact, subject) in requires(&runner.operation) {
            // The latest step before it that establishes the fact; one that runs now does so
            // itself.
            let Some(origin) = steps[..runner.index]
                .iter()
                .rev()
                .find(|step| establishes(&step.operation) == Some((fact, subject)))
            else {
                continue;
            };
            if !finished(origin.index) {
                continue;
            }
            let changed = steps[origin.index + 1..]
                .iter()
                .find(|step| finished(step.index) && undoes(&step.operation, fact, subject));
            match changed {
                Some(changer) => warnings.push(format!(
                    "step {} '{}' relies on {}, which step {} '{}' established; not re-verified because step {} '{}' ({}) ran after it and may have changed that on purpose",
                    runner.index + 1,
                    runner.name,
                    fact.describe(subject),
                    origin.index + 1,
                    origin.name,
                    changer.index + 1,
                    changer.name,
                    changer.operation.key()
                )),
                None => {
                    if matches!(plans[origin.index], ResumePlan::Skip(_)) {
                        plans[origin.index] = ResumePlan::Verify(format!(
                            "re-verifying that {} for step {} '{}'",
                            fact.describe(subject),
                            runner.index + 1,
                            runner.name
                        ));
                    }
                }
            }
        }
    }
    (plans, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const DRAIN: &str = "\
name: t
steps:
  - name: inspect
    inspect: {name: q}
  - name: approve
    approve: {message: go}
  - name: stop
    stop-consumers: {name: q, exec: 'true'}
  - name: expand
    expand: {name: q, factor: 2}
  - name: forward
    forward: {name: q, background: true}
  - name: scale up
    exec: {command: 'true'}
  - name: source empty
    wait: {name: q, until: source.depth == 0}
  - name: stop forwarding
    stop-forward: {forward: forward}
  - name: restart
    exec: {command: 'true'}
  - name: temporary drained
    wait: {name: q, until: temporary.depth == 0}
  - name: restore
    restore: {name: q}
";

    fn plans_after(finished_steps: usize) -> (Vec<ResumePlan>, Vec<String>) {
        let playbook = super::super::parse(Path::new("p.yaml"), DRAIN, &[], &|_| None).unwrap();
        plan(&playbook, &|index| index < finished_steps)
    }

    fn kinds(plans: &[ResumePlan]) -> Vec<&'static str> {
        plans
            .iter()
            .map(|plan| match plan {
                ResumePlan::Run => "run",
                ResumePlan::Verify(_) => "verify",
                ResumePlan::Skip(_) => "skip",
            })
            .collect()
    }

    #[test]
    fn killed_while_forwarding_restarts_the_forward_on_verified_state() {
        // Killed right after the background forward started.
        let (plans, warnings) = plans_after(5);
        assert_eq!(
            kinds(&plans),
            ["skip", "skip", "verify", "verify", "run", "run", "run", "run", "run", "run", "run"]
        );
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn an_exec_after_stop_consumers_means_no_consumer_check() {
        // Killed during the source gate: the scale-up exec ran after stop-consumers.
        let (plans, warnings) = plans_after(6);
        assert_eq!(
            kinds(&plans),
            ["skip", "skip", "skip", "verify", "run", "skip", "run", "run", "run", "run", "run"]
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("step 6 'scale up' (exec)"),
            "{warnings:?}"
        );
    }

    #[test]
    fn killed_after_the_restart_re_checks_nothing() {
        // Killed during the temporary-drained gate: the application runs again, the forward
        // was stopped; nothing a remaining step relies on is re-checked.
        let (plans, warnings) = plans_after(9);
        assert_eq!(
            kinds(&plans),
            [
                "skip", "skip", "skip", "skip", "skip", "skip", "skip", "skip", "skip", "run",
                "run"
            ]
        );
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn restore_undoes_expand() {
        let playbook = super::super::parse(
            Path::new("p.yaml"),
            "name: t\nsteps:\n  - expand: {name: q, factor: 2}\n  - restore: {name: q}\n  - forward: {name: q}\n",
            &[],
            &|_| None,
        )
        .unwrap();
        let (plans, warnings) = plan(&playbook, &|index| index < 2);
        assert_eq!(kinds(&plans), ["skip", "skip", "run"]);
        assert!(
            warnings[0].contains("temporary topology of 'q'"),
            "{warnings:?}"
        );
    }
}
