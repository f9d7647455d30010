//! The only layer that writes to the terminal: progress renderers and result views.

pub mod inspect;
pub mod progress;

use crate::cli::OutputFormat;
use crate::error::Error;
use crate::progress::Progress;
use std::io::IsTerminal;
use std::sync::Arc;

/// Picks the renderer: JSON lines, indicatif bars on a terminal, or plain timestamped lines.
pub fn progress_for(format: OutputFormat) -> Progress {
    match format {
        OutputFormat::Json => Arc::new(progress::JsonLines),
        OutputFormat::Human if std::io::stderr().is_terminal() => Arc::new(progress::Bars::new()),
        OutputFormat::Human => Arc::new(progress::PlainLines::default()),
    }
}

/// Reports a failure: one line on stderr, and a JSON document on stdout for `--output json`.
pub fn print_error(format: OutputFormat, error: &Error) {
    eprintln!("mqdrain: error: {error}");
    if format == OutputFormat::Json {
        let document = serde_json::json!({
            "error": error.to_string(),
            "exit_code": error.exit_code(),
        });
        println!("{document}");
    }
}
