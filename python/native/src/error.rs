//! Error type shared by the platform modules, and its mapping to Python exceptions.

use std::path::PathBuf;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::PyErr;

/// Anything that can go wrong while taking a memory snapshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A kernel file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying IO error.
        source: std::io::Error,
    },
    /// A kernel file had unexpected contents.
    #[error("cannot parse {what}: {detail}")]
    Parse {
        /// What was being parsed, e.g. `"/proc/meminfo"`.
        what: &'static str,
        /// What was wrong with it.
        detail: String,
    },
}

impl Error {
    /// Shorthand for building an [`Error::Parse`].
    pub fn parse(what: &'static str, detail: impl Into<String>) -> Self {
        Error::Parse {
            what,
            detail: detail.into(),
        }
    }
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        match err {
            Error::Io { .. } => PyOSError::new_err(err.to_string()),
            Error::Parse { .. } => PyValueError::new_err(err.to_string()),
        }
    }
}
