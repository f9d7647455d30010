//! Typed errors of the core and the exit-code table they map to.

use std::process::ExitCode;

/// Exit codes, documented in the README; `main` is the only place that exits.
pub mod exit {
    pub const OK: u8 = 0;
    /// The operation ran and failed (a broker refused, a check did not pass).
    pub const FAILED: u8 = 1;
    /// Bad usage, configuration or playbook: nothing was attempted.
    pub const USAGE: u8 = 2;
    /// The named queue, topic or consumer group does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// A broker or its management API could not be reached, or refused the credentials.
    pub const CONNECTION: u8 = 4;
    /// A bounded wait (`--timeout`, `--wait`) ran out before its condition held.
    pub const TIMEOUT: u8 = 5;
    /// Cancelled by SIGINT/SIGTERM.
    pub const CANCELLED: u8 = 130;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operator asked for something malformed; `hint` says how to fix it.
    #[error("{message}")]
    Usage { message: String },

    #[error("{kind} '{name}' not found{scope}: {hint}")]
    NotFound {
        kind: &'static str,
        name: String,
        /// " in vhost '/'" or "" — keeps the message one line.
        scope: String,
        hint: String,
    },

    #[error("cannot reach {service} at {endpoint}: {detail}. Check that it is running and that the address and port are right")]
    Unreachable {
        service: &'static str,
        /// Always already redacted.
        endpoint: String,
        detail: String,
    },

    #[error("{service} at {endpoint} refused the credentials of user '{user}': check the user and password in the URL (or the management URL)")]
    AccessRefused {
        service: &'static str,
        endpoint: String,
        user: String,
    },

    /// The broker answered, but not with what the operation needed.
    #[error("{0}")]
    Broker(String),

    #[error("{0}")]
    Timeout(String),

    #[error("cancelled")]
    Cancelled,
}

impl Error {
    pub fn usage(message: impl Into<String>) -> Self {
        Error::Usage {
            message: message.into(),
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage { .. } => exit::USAGE,
            Error::NotFound { .. } => exit::NOT_FOUND,
            Error::Unreachable { .. } | Error::AccessRefused { .. } => exit::CONNECTION,
            Error::Broker(_) => exit::FAILED,
            Error::Timeout(_) => exit::TIMEOUT,
            Error::Cancelled => exit::CANCELLED,
        }
    }
}

impl From<&Error> for ExitCode {
    fn from(error: &Error) -> Self {
        ExitCode::from(error.exit_code())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
