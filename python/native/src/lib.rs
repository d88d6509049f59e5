//! `mlx_flash._native`: the Rust half of mlx-flash, exposed to Python via PyO3.
//!
//! This file is only the Python boundary; the logic lives in `memory`
//! (platform-independent model and pressure classification) and in one module
//! per platform (currently `linux`).
//!
//! Rust unit tests are plain `cargo test` (pure Rust, no interpreter needed).

// Until the macOS backend lands, the shared model is unused on other platforms.
#![cfg_attr(not(target_os = "linux"), allow(dead_code))]

mod error;
#[cfg(target_os = "linux")]
mod linux;
mod memory;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::memory::MemorySnapshot;

/// Return a snapshot of system memory as a dict (see `_native.pyi` for the keys).
#[pyfunction]
fn memory_snapshot(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    #[cfg(target_os = "linux")]
    {
        to_dict(py, &linux::snapshot()?)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = py;
        Err(pyo3::exceptions::PyNotImplementedError::new_err(
            "memory_snapshot is not implemented on this platform yet",
        ))
    }
}

fn to_dict<'py>(py: Python<'py>, s: &MemorySnapshot) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("platform", s.platform)?;
    d.set_item("total_bytes", s.total_bytes)?;
    d.set_item("available_bytes", s.available_bytes)?;
    d.set_item("used_bytes", s.used_bytes)?;
    d.set_item("swap_used_bytes", s.swap_used_bytes)?;
    d.set_item("cgroup_limit_bytes", s.cgroup.map(|c| c.limit_bytes))?;
    d.set_item("cgroup_usage_bytes", s.cgroup.map(|c| c.usage_bytes))?;
    d.set_item("psi_some_avg10", s.psi.map(|p| p.some_avg10))?;
    d.set_item("psi_full_avg10", s.psi.map(|p| p.full_avg10))?;
    let a = &s.assessment;
    d.set_item("effective_available_bytes", a.effective_available_bytes)?;
    d.set_item("effective_total_bytes", a.effective_total_bytes)?;
    d.set_item("pressure", a.pressure.as_str())?;
    Ok(d)
}

/// The `mlx_flash._native` extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(memory_snapshot, m)?)?;
    Ok(())
}
