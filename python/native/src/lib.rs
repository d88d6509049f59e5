//! `mlx_flash._native`: the Rust half of mlx-flash, exposed to Python via PyO3.
//!
//! Only the Python boundary lives here: the memory reader and the sidecar are the
//! `mlx-flash-sidecar` crate, so both sides share one classification and one server.
#![forbid(unsafe_code)]

use pyo3::exceptions::{PyNotImplementedError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use mlx_flash_sidecar::memory::{self, MemoryError};

/// Return a snapshot of system memory as a dict (see `_native.pyi` for the keys).
#[pyfunction]
fn memory_snapshot(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let snapshot = memory::snapshot().map_err(to_py_err)?;
    let d = PyDict::new(py);
    if let serde_json::Value::Object(fields) = snapshot.to_json() {
        for (key, value) in fields {
            match value {
                serde_json::Value::String(s) => d.set_item(key, s)?,
                serde_json::Value::Number(n) => match n.as_u64() {
                    Some(u) => d.set_item(key, u)?,
                    None => d.set_item(key, n.as_f64())?,
                },
                _ => d.set_item(key, py.None())?,
            }
        }
    }
    Ok(d)
}

fn to_py_err(err: MemoryError) -> PyErr {
    match err {
        MemoryError::Parse { .. } => PyValueError::new_err(err.to_string()),
        MemoryError::Unsupported => PyNotImplementedError::new_err(err.to_string()),
        MemoryError::Io { .. } | MemoryError::Sys { .. } => PyOSError::new_err(err.to_string()),
    }
}

/// Run the sidecar with command-line `args` (as `mlx-flash serve` would get them, without the
/// program name) until SIGINT/SIGTERM; returns the exit code. The GIL is released throughout.
#[pyfunction]
fn serve(py: Python<'_>, args: Vec<String>) -> i32 {
    let argv = std::iter::once("mlx-flash serve".to_owned()).chain(args);
    py.detach(|| mlx_flash_sidecar::main_with_args(argv.map(Into::into)))
}

/// The `mlx_flash._native` extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(memory_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(serve, m)?)?;
    Ok(())
}
