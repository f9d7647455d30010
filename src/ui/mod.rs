//! The only layer that writes to the terminal: progress renderers and result views.

pub mod dlq;
pub mod drain;
pub mod inspect;
pub mod plan;
pub mod playbook;
pub mod progress;

use crate::cli::OutputFormat;
use crate::error::Error;
use crate::progress::Progress;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Picks the renderer: JSON lines, indicatif bars on a terminal, or plain timestamped lines.
pub fn progress_for(format: OutputFormat) -> Progress {
    match format {
        OutputFormat::Json => Arc::new(progress::JsonLines),
        OutputFormat::Human if std::io::stderr().is_terminal() => Arc::new(progress::Bars::new()),
        OutputFormat::Human => Arc::new(progress::PlainLines::default()),
    }
}

/// Writes to stdout; a closed pipe (`mqdrain watch | head`) is not worth a panic.
pub fn out(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// Writes a line to stderr, ignoring a closed stream.
pub fn err_line(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Set once a command printed its own JSON result document (which carries its error and exit
/// code), so a failure does not add a second document to stdout.
static RESULT_DOCUMENT_PRINTED: AtomicBool = AtomicBool::new(false);

pub fn result_document_printed() {
    RESULT_DOCUMENT_PRINTED.store(true, Ordering::Relaxed);
}

/// Reports a failure: one line on stderr, and a JSON document on stdout for `--output json`.
pub fn print_error(format: OutputFormat, error: &Error) {
    err_line(&format!("mqdrain: error: {error}"));
    if format == OutputFormat::Json && !RESULT_DOCUMENT_PRINTED.load(Ordering::Relaxed) {
        let document = serde_json::json!({
            "error": error.to_string(),
            "exit_code": error.exit_code(),
        });
        out(&format!("{document}\n"));
    }
}
