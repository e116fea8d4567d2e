//! The CLI's one error type and its exit codes: 2 for what the user can fix in the command or
//! the config, 1 for what went wrong at run time. The message is printed as one line.

use std::process::ExitCode;

/// A failed command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line asks for something that cannot work (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A configuration file is wrong (exit 2); the message names FILE:LINE.
    #[error("{0}")]
    Config(String),
    /// Something failed while running (exit 1).
    #[error("{0}")]
    Runtime(String),
    /// Whoever read our output stopped reading (`feedsync status | head`): nothing left to
    /// say, and nothing went wrong (exit 0, no message).
    #[error("output closed")]
    OutputClosed,
}

impl CliError {
    /// Whether this is no error at all for the user (see [`CliError::OutputClosed`]).
    pub fn is_quiet(&self) -> bool {
        matches!(self, CliError::OutputClosed)
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::BrokenPipe => CliError::OutputClosed,
            _ => CliError::Runtime(e.to_string()),
        }
    }
}

impl CliError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) | CliError::Config(_) => ExitCode::from(2),
            CliError::Runtime(_) => ExitCode::from(1),
            CliError::OutputClosed => ExitCode::SUCCESS,
        }
    }
}

/// Run-time failures from the library become exit 1 with their message.
macro_rules! runtime_from {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for CliError {
            fn from(e: $t) -> Self {
                CliError::Runtime(e.to_string())
            }
        }
    )*};
}

runtime_from!(
    feedsync::core::FeedError,
    feedsync::drive::DriveError,
    serde_json::Error,
    feedsync::sync::StopError,
    feedsync::sync::StartError,
);

/// Shorthand for a run-time error with a message.
pub fn runtime(message: impl Into<String>) -> CliError {
    CliError::Runtime(message.into())
}

/// Shorthand for a usage error with a message.
pub fn usage(message: impl Into<String>) -> CliError {
    CliError::Usage(message.into())
}
