//! Entry point: parse arguments, run the operation on a tokio runtime, map the result to an exit code.

use clap::Parser;
use mqdrain::cli::{Cli, Command, OutputFormat};
use mqdrain::error::{exit, Error, Result};
use mqdrain::ops;
use mqdrain::ui;
use std::process::ExitCode;

fn main() -> ExitCode {
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
            eprintln!("mqdrain: error: cannot start the async runtime: {error}");
            return ExitCode::from(exit::FAILED);
        }
    };
    let format = cli.output;
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            ui::print_error(format, &error);
            ExitCode::from(&error)
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let target = cli.connection.target()?;
    let progress = ui::progress_for(cli.output);
    match &cli.command {
        Command::Inspect(args) => {
            let report = ops::inspect::execute(&target, &args.into(), &progress).await?;
            match cli.output {
                OutputFormat::Json => println!("{}", to_json(&report)?),
                OutputFormat::Human => print!("{}", ui::inspect::render(&report)),
            }
        }
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string_pretty(value)
        .map_err(|error| Error::Broker(format!("cannot encode the result as JSON: {error}")))
}
