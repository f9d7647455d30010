//! Entry point: parse arguments, run the operation on a tokio runtime, map the result to an exit code.

use clap::Parser;
use mqdrain::cli::dlq::DlqCommand;
use mqdrain::cli::{Cli, Command, OutputFormat};
use mqdrain::error::{exit, Error, Result};
use mqdrain::ops::{dlq, drain, inspect, plan};
use mqdrain::ui;
use serde::Serialize;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // --help and --version are "errors" to clap that print to stdout and succeed.
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(exit::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            ui::err_line(&format!(
                "mqdrain: error: cannot start the async runtime: {error}"
            ));
            return ExitCode::from(exit::FAILED);
        }
    };
    let format = cli.output;
    let cancel = CancellationToken::new();
    runtime.spawn(handle_signals(cancel.clone()));
    match runtime.block_on(run(cli, cancel)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            ui::print_error(format, &error);
            ExitCode::from(&error)
        }
    }
}

/// The global allocator (mimalloc, brought in by a dependency) asks the kernel for transparent huge
/// pages: every 2 MiB page it touches is cleared and resident as a whole. For a process holding a
/// few MiB of live data that cost the forwarder a third of its peak RSS and CPU time clearing
/// pages (measured: 54-60 MiB -> 38-39 MiB at the same backlog). Best effort: a kernel without
/// the switch simply keeps huge pages.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// First SIGINT/SIGTERM: cancel, so work in flight finishes. Second: exit 130 at once.
async fn handle_signals(cancel: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    for count in 1.. {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        if count == 1 {
            ui::err_line(
                "mqdrain: stopping: finishing messages in flight (signal again to exit at once)",
            );
            cancel.cancel();
        } else {
            std::process::exit(i32::from(exit::CANCELLED));
        }
    }
}

fn emit<T: Serialize>(
    format: OutputFormat,
    value: &T,
    human: impl FnOnce(&T) -> String,
) -> Result<()> {
    match format {
        OutputFormat::Json => {
            let text = serde_json::to_string_pretty(value).map_err(|error| {
                Error::Broker(format!("cannot encode the result as JSON: {error}"))
            })?;
            ui::out(&format!("{text}\n"));
        }
        OutputFormat::Human => ui::out(&human(value)),
    }
    Ok(())
}

async fn run(cli: Cli, cancel: CancellationToken) -> Result<()> {
    // A playbook names its own broker; --url is only its fallback.
    if let Command::Playbook(args) = &cli.command {
        return ui::playbook::command(args, &cli.connection, cli.output, &cancel).await;
    }
    let target = cli.connection.target()?;
    let progress = ui::progress_for(cli.output);
    let format = cli.output;
    match &cli.command {
        Command::Inspect(args) => {
            let report = inspect::execute(&target, &args.into(), &progress).await?;
            emit(format, &report, ui::inspect::render)
        }
        Command::StopConsumers(args) => {
            let outcome =
                drain::stop_consumers(&target, &args.into(), args.dry_run.dry_run, &progress)
                    .await?;
            emit(format, &outcome, ui::drain::stop_consumers)
        }
        Command::Expand(args) => {
            let outcome =
                drain::expand(&target, &args.into(), args.dry_run.dry_run, &progress).await?;
            emit(format, &outcome, ui::drain::expand)
        }
        Command::Forward(args) => {
            let outcome = drain::forward(
                &target,
                &args.into(),
                args.dry_run.dry_run,
                &progress,
                &cancel,
            )
            .await?;
            emit(format, &outcome, ui::drain::forward)
        }
        Command::Plan(args) => {
            let report = plan::execute(&target, &args.into(), &progress).await?;
            emit(format, &report, ui::plan::render)
        }
        Command::Watch(args) => {
            // Human output comes from the progress renderer's bars or lines.
            let mut print_sample = |sample: &drain::WatchSample| {
                if format == OutputFormat::Json {
                    if let Ok(line) = serde_json::to_string(sample) {
                        ui::out(&format!("{line}\n"));
                    }
                }
            };
            let outcome =
                drain::watch(&target, &args.into(), &progress, &cancel, &mut print_sample).await?;
            if format == OutputFormat::Human {
                ui::out(&ui::drain::watch(&outcome));
            }
            Ok(())
        }
        Command::Restore(args) => {
            let outcome = drain::restore(
                &target,
                &args.into(),
                args.dry_run.dry_run,
                &progress,
                &cancel,
            )
            .await?;
            emit(format, &outcome, ui::drain::restore)
        }
        Command::Dlq(dlq_args) => match &dlq_args.command {
            DlqCommand::Inspect(args) => {
                let report = dlq::inspect(&target, &args.into(), &progress).await?;
                emit(format, &report, ui::dlq::inspect)
            }
            DlqCommand::Replay(args) => {
                let spec = args.as_ref().into();
                let outcome =
                    dlq::replay(&target, &spec, args.dry_run.dry_run, &progress, &cancel).await?;
                emit(format, &outcome, ui::dlq::replay)
            }
        },
        Command::Load(args) => {
            ui::playbook::load_command(args, &target, format, &progress, &cancel).await
        }
        // Dispatched before the target is parsed (see the top of this function).
        Command::Playbook(_) => Ok(()),
    }
}
