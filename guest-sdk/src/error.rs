//! The SDK's error type: a message that crosses to the host as the `err`
//! string of the failing call.

use std::fmt;

/// An operator error. Returning it from any [`Operator`](crate::Operator)
/// method fails the call; the host then fails the task (and applies the job's
/// restart strategy) with this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

impl Error {
    /// An error with the given message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
        }
    }

    /// The message, as the host will see it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Self {
        Self::msg(format_args!("JSON error: {err}"))
    }
}

impl From<std::str::Utf8Error> for Error {
    fn from(err: std::str::Utf8Error) -> Self {
        Self::msg(format_args!("invalid UTF-8: {err}"))
    }
}

impl From<Error> for String {
    fn from(err: Error) -> Self {
        err.message
    }
}
