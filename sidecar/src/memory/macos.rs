//! macOS backend: `host_statistics64` page counts, `hw.memsize`, `vm.swapusage`
//! and the kernel's own verdict, `kern.memorystatus_vm_pressure_level`.
//!
//! The arithmetic is pure and compiled on every platform so it is unit-tested
//! on Linux; only [`snapshot`] and its `sys` helpers talk to the kernel.

// Reading Mach and sysctl counters needs FFI; each call sits in a tiny commented block.
#![allow(unsafe_code)]

use super::{assess, worst, MemorySnapshot, Pressure};

/// `NOTE_MEMORYSTATUS_PRESSURE_NORMAL` (`<sys/event.h>`), as reported by the sysctl.
const KERNEL_PRESSURE_NORMAL: i32 = 0x1;
/// `NOTE_MEMORYSTATUS_PRESSURE_WARN`.
const KERNEL_PRESSURE_WARN: i32 = 0x2;
/// `NOTE_MEMORYSTATUS_PRESSURE_CRITICAL`.
const KERNEL_PRESSURE_CRITICAL: i32 = 0x4;

/// Map a raw `kern.memorystatus_vm_pressure_level` to a [`Pressure`].
///
/// Returns `None` for values the kernel does not document (then only the
/// numbers count).
pub fn kernel_level(raw: i32) -> Option<Pressure> {
    match raw {
        KERNEL_PRESSURE_NORMAL => Some(Pressure::Normal),
        KERNEL_PRESSURE_WARN => Some(Pressure::Warning),
        KERNEL_PRESSURE_CRITICAL => Some(Pressure::Critical),
        _ => None,
    }
}

/// The `vm_statistics64` page counts that make up available memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmPages {
    /// `free_count`. Speculative pages are already included in it.
    pub free: u64,
    /// `speculative_count`: read-ahead file pages nobody has touched yet.
    pub speculative: u64,
    /// `external_page_count`: file-backed pageable pages (the file cache).
    pub external: u64,
    /// `purgeable_count`: volatile purgeable pages the kernel may drop at will.
    pub purgeable: u64,
}

/// Bytes the host can hand out without compressing or swapping anything,
/// capped at `total_bytes`.
///
/// available = (free - speculative) + external + purgeable, i.e. the free
/// pages plus what Activity Monitor calls "Cached Files" (external +
/// purgeable). Up to pages on no queue, that is Activity Monitor's
/// `total - Memory Used`, where Memory Used = App Memory (internal -
/// purgeable) + Wired + Compressed.
pub fn available_bytes(pages: VmPages, page_size: u64, total_bytes: u64) -> u64 {
    // psutil uses `free + inactive` and sysinfo `free + inactive + purgeable -
    // compressor`. Both count inactive *anonymous* pages as available,
    // but those can only be reclaimed by compressing or swapping them, which is
    // the pressure we want to see. They also miss the active file cache, which
    // is cheap to drop. Speculative pages are subtracted from `free` because
    // they are file pages and so are already counted in `external`. If they
    // were not, leaving them out only errs on the cautious side.
    pages
        .free
        .saturating_sub(pages.speculative)
        .saturating_add(pages.external)
        .saturating_add(pages.purgeable)
        .saturating_mul(page_size)
        .min(total_bytes)
}

/// Build the snapshot from raw numbers. The final pressure is the worse of
/// the kernel's verdict (if known) and what [`assess`] derives from the numbers.
pub fn snapshot_from(
    total_bytes: u64,
    available_bytes: u64,
    swap_used_bytes: u64,
    kernel: Option<Pressure>,
) -> MemorySnapshot {
    // No cgroups and no PSI on macOS.
    let mut assessment = assess(total_bytes, available_bytes, None, None);
    if let Some(kernel) = kernel {
        assessment.pressure = worst(assessment.pressure, kernel);
    }
    MemorySnapshot {
        platform: "macos",
        total_bytes,
        available_bytes,
        used_bytes: total_bytes.saturating_sub(available_bytes),
        swap_used_bytes,
        cgroup: None,
        psi: None,
        assessment,
    }
}

/// Take a memory snapshot of this host.
///
/// Fails with [`MemoryError::Sys`](super::MemoryError::Sys) if a Mach call or
/// sysctl fails; an unknown or missing pressure-level sysctl only drops the
/// kernel's verdict.
#[cfg(target_os = "macos")]
pub fn snapshot() -> Result<MemorySnapshot, super::MemoryError> {
    let total_bytes: u64 = sys::sysctl(c"hw.memsize")?;
    let host = sys::HostPort::new();
    let page_size = host.page_size()?;
    let vm = host.vm_statistics()?;
    let pages = VmPages {
        free: vm.free_count.into(),
        speculative: vm.speculative_count.into(),
        external: vm.external_page_count.into(),
        purgeable: vm.purgeable_count.into(),
    };
    let swap: libc::xsw_usage = sys::sysctl(c"vm.swapusage")?;
    let kernel = sys::sysctl_if_exists::<i32>(c"kern.memorystatus_vm_pressure_level")?
        .and_then(kernel_level);
    Ok(snapshot_from(
        total_bytes,
        available_bytes(pages, page_size, total_bytes),
        swap.xsu_used,
        kernel,
    ))
}

/// The system calls behind [`snapshot`].
#[cfg(target_os = "macos")]
mod sys {
    use std::ffi::{c_void, CStr};
    use std::io;
    use std::mem::{size_of, MaybeUninit};

    use libc::{host_t, kern_return_t, mach_port_t, vm_size_t, KERN_SUCCESS};
    use mach2::mach_port::mach_port_deallocate;
    use mach2::traps::mach_task_self;

    use super::super::MemoryError;

    // <mach/mach_init.h>, <mach/mach_host.h>: libc's `mach_host_self` is
    // deprecated in favour of mach2, and mach2 0.4 has neither function.
    extern "C" {
        fn mach_host_self() -> mach_port_t;
        fn host_page_size(host: host_t, out_page_size: *mut vm_size_t) -> kern_return_t;
    }

    /// Plain C data a sysctl may fill in: every bit pattern is a valid value.
    pub trait SysctlValue: Copy {}
    impl SysctlValue for i32 {}
    impl SysctlValue for u64 {}
    impl SysctlValue for libc::xsw_usage {}

    /// Read a fixed-size sysctl value by name.
    pub fn sysctl<T: SysctlValue>(name: &'static CStr) -> Result<T, MemoryError> {
        sysctl_if_exists(name)?
            .ok_or_else(|| sys_error(name, io::Error::from_raw_os_error(libc::ENOENT)))
    }

    /// Like [`sysctl`], but a name this kernel does not know is `Ok(None)`.
    pub fn sysctl_if_exists<T: SysctlValue>(name: &'static CStr) -> Result<Option<T>, MemoryError> {
        let mut value = MaybeUninit::<T>::zeroed();
        let mut len = size_of::<T>();
        // SAFETY: `name` is NUL-terminated; `value` is writable for `len` bytes
        // and the kernel writes at most `len` bytes; no new value is set.
        let rc = unsafe {
            libc::sysctlbyname(
                name.as_ptr(),
                value.as_mut_ptr().cast::<c_void>(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENOENT) => Ok(None),
                _ => Err(sys_error(name, err)),
            };
        }
        if len != size_of::<T>() {
            return Err(MemoryError::Sys {
                call: "sysctlbyname",
                detail: format!(
                    "{}: returned {len} bytes, expected {}",
                    name.to_string_lossy(),
                    size_of::<T>()
                ),
            });
        }
        // SAFETY: zero-initialised, then fully written; `T: SysctlValue` is valid
        // for any bit pattern.
        Ok(Some(unsafe { value.assume_init() }))
    }

    fn sys_error(name: &CStr, err: io::Error) -> MemoryError {
        MemoryError::Sys {
            call: "sysctlbyname",
            detail: format!("{}: {err}", name.to_string_lossy()),
        }
    }

    fn mach_error(call: &'static str, kr: kern_return_t) -> MemoryError {
        MemoryError::Sys {
            call,
            detail: format!("kern_return_t {kr}"),
        }
    }

    /// A send right to the host port, released on drop (each
    /// `mach_host_self` call adds a user reference).
    pub struct HostPort(mach_port_t);

    impl HostPort {
        pub fn new() -> Self {
            // SAFETY: no preconditions; returns a send right we now own.
            HostPort(unsafe { mach_host_self() })
        }

        /// The kernel's page size, the unit of `host_statistics64` counts.
        /// Unlike `vm_page_size`/`hw.pagesize` (the task's page size) it stays
        /// right for a 4 KiB x86_64 process under Rosetta on a 16 KiB kernel.
        pub fn page_size(&self) -> Result<u64, MemoryError> {
            let mut size: vm_size_t = 0;
            // SAFETY: `size` is a valid out-pointer for the duration of the call.
            let kr = unsafe { host_page_size(self.0, &mut size) };
            if kr != KERN_SUCCESS {
                return Err(mach_error("host_page_size", kr));
            }
            Ok(size as u64)
        }

        /// `host_statistics64(HOST_VM_INFO64)`.
        pub fn vm_statistics(&self) -> Result<libc::vm_statistics64, MemoryError> {
            let mut stats = MaybeUninit::<libc::vm_statistics64>::zeroed();
            let mut count = libc::HOST_VM_INFO64_COUNT;
            // SAFETY: `stats` is writable for `count` integer_t's (its own size);
            // the kernel writes at most that many and lowers `count` to match.
            let kr = unsafe {
                libc::host_statistics64(
                    self.0,
                    libc::HOST_VM_INFO64,
                    stats.as_mut_ptr().cast(),
                    &mut count,
                )
            };
            if kr != KERN_SUCCESS {
                return Err(mach_error("host_statistics64", kr));
            }
            // SAFETY: zero-initialised plain integers; fields an older kernel did
            // not fill stay zero.
            Ok(unsafe { stats.assume_init() })
        }
    }

    impl Drop for HostPort {
        fn drop(&mut self) {
            // SAFETY: we own one send right to `self.0`, from `mach_host_self`.
            // Failure would only leak a reference, so the result is ignored.
            let _ = unsafe { mach_port_deallocate(mach_task_self(), self.0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    /// Apple Silicon kernel page size.
    const PAGE: u64 = 16 * 1024;

    #[test]
    fn kernel_levels() {
        assert_eq!(kernel_level(1), Some(Pressure::Normal));
        assert_eq!(kernel_level(2), Some(Pressure::Warning));
        assert_eq!(kernel_level(4), Some(Pressure::Critical));
        for unknown in [0, 3, 5, 8, -1, i32::MAX] {
            assert_eq!(kernel_level(unknown), None, "raw {unknown}");
        }
    }

    #[test]
    fn available_is_free_plus_cached_files() {
        let pages = VmPages {
            free: 1000,
            speculative: 200,
            external: 3000,
            purgeable: 50,
        };
        assert_eq!(
            available_bytes(pages, PAGE, 64 * GIB),
            (800 + 3000 + 50) * PAGE
        );
        assert_eq!(available_bytes(pages, 4096, 64 * GIB), 3850 * 4096);
    }

    #[test]
    fn available_saturates_and_is_capped() {
        // Counts are sampled non-atomically, so speculative can exceed free.
        let racy = VmPages {
            free: 10,
            speculative: 20,
            external: 5,
            purgeable: 0,
        };
        assert_eq!(available_bytes(racy, PAGE, GIB), 5 * PAGE);
        // Never more than physical memory, and no overflow.
        let huge = VmPages {
            free: u64::MAX,
            speculative: 0,
            external: u64::MAX,
            purgeable: 1,
        };
        assert_eq!(available_bytes(huge, PAGE, 8 * GIB), 8 * GIB);
        assert_eq!(available_bytes(VmPages::default(), PAGE, 8 * GIB), 0);
    }

    #[test]
    fn snapshot_fields() {
        let s = snapshot_from(32 * GIB, 8 * GIB, GIB, Some(Pressure::Normal));
        assert_eq!(s.platform, "macos");
        assert_eq!(s.total_bytes, 32 * GIB);
        assert_eq!(s.available_bytes, 8 * GIB);
        assert_eq!(s.used_bytes, 24 * GIB);
        assert_eq!(s.swap_used_bytes, GIB);
        assert_eq!(s.cgroup, None);
        assert_eq!(s.psi, None);
        assert_eq!(s.assessment.effective_total_bytes, 32 * GIB);
        assert_eq!(s.assessment.effective_available_bytes, 8 * GIB);
        assert_eq!(s.assessment.pressure, Pressure::Normal);
    }

    #[test]
    fn kernel_verdict_can_only_raise_pressure() {
        let level =
            |available, kernel| snapshot_from(100, available, 0, kernel).assessment.pressure;
        // Plenty free by the numbers: the kernel decides.
        assert_eq!(level(50, None), Pressure::Normal);
        assert_eq!(level(50, Some(Pressure::Normal)), Pressure::Normal);
        assert_eq!(level(50, Some(Pressure::Warning)), Pressure::Warning);
        assert_eq!(level(50, Some(Pressure::Critical)), Pressure::Critical);
        // Tight by the numbers: a calmer kernel does not lower it.
        assert_eq!(level(10, Some(Pressure::Normal)), Pressure::Warning);
        assert_eq!(level(10, Some(Pressure::Critical)), Pressure::Critical);
        assert_eq!(level(2, Some(Pressure::Normal)), Pressure::Critical);
        assert_eq!(level(2, None), Pressure::Critical);
    }

    #[test]
    fn raw_kernel_level_folds_in() {
        let s = snapshot_from(100, 50, 0, kernel_level(4));
        assert_eq!(s.assessment.pressure, Pressure::Critical);
        let s = snapshot_from(100, 10, 0, kernel_level(7));
        assert_eq!(s.assessment.pressure, Pressure::Warning);
    }
}
