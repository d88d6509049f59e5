//! Linux backend: `/proc/meminfo`, the process's memory cgroup (v1 or v2) and
//! `/proc/pressure/memory`.
//!
//! Parsers are pure functions over file contents so they can be unit-tested;
//! [`snapshot`] does the IO.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::{assess, CgroupMemory, MemoryError as Error, MemorySnapshot, Psi};

const MEMINFO: &str = "/proc/meminfo";
const SELF_CGROUP: &str = "/proc/self/cgroup";
const PSI_MEMORY: &str = "/proc/pressure/memory";
const CGROUP_V1_MEMORY_MOUNT: &str = "/sys/fs/cgroup/memory";
const CGROUP_V2_MOUNT: &str = "/sys/fs/cgroup";
/// cgroup v1 reports "no limit" as a huge page-aligned number (~2^63); anything this big is unlimited.
const CGROUP_V1_UNLIMITED: u64 = 1 << 60;

/// The fields of `/proc/meminfo` we use, converted to bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    /// `MemTotal`.
    pub total_bytes: u64,
    /// `MemAvailable`.
    pub available_bytes: u64,
    /// `SwapTotal`.
    pub swap_total_bytes: u64,
    /// `SwapFree`.
    pub swap_free_bytes: u64,
}

/// Where the process's memory controller lives, from `/proc/self/cgroup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupPath<'a> {
    /// cgroup v1 `memory` controller, e.g. `5:memory:/docker/abc`.
    V1(&'a str),
    /// cgroup v2 unified hierarchy, e.g. `0::/user.slice`.
    V2(&'a str),
}

/// Parse `/proc/meminfo`. Values there are in kB (really KiB).
pub fn parse_meminfo(contents: &str) -> Result<MemInfo, Error> {
    let field = |name: &str| -> Result<u64, Error> {
        let line = contents
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .ok_or_else(|| Error::parse(MEMINFO, format!("missing {name}")))?;
        let kib = line.trim().trim_end_matches("kB").trim();
        kib.parse::<u64>()
            .map(|kib| kib.saturating_mul(1024))
            .map_err(|e| Error::parse(MEMINFO, format!("{name}: {e}")))
    };
    Ok(MemInfo {
        total_bytes: field("MemTotal")?,
        available_bytes: field("MemAvailable")?,
        swap_total_bytes: field("SwapTotal")?,
        swap_free_bytes: field("SwapFree")?,
    })
}

/// Find the memory cgroup in `/proc/self/cgroup`.
///
/// A v1 `memory` controller wins over the v2 `0::` line: on hybrid systems the
/// unified hierarchy exists but does not manage memory.
pub fn parse_self_cgroup(contents: &str) -> Option<CgroupPath<'_>> {
    let mut v2 = None;
    for line in contents.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.split(',').any(|c| c == "memory") {
            return Some(CgroupPath::V1(path));
        }
        if id == "0" && controllers.is_empty() {
            v2 = Some(CgroupPath::V2(path));
        }
    }
    v2
}

/// Parse a cgroup limit file (`memory.max` or `memory.limit_in_bytes`).
///
/// Returns `None` for "no limit": the literal `max` (v2), a value of at least
/// 2^60 (v1's stand-in for infinity), or a value above host memory, which
/// cannot constrain anything.
pub fn parse_cgroup_limit(contents: &str, mem_total_bytes: u64) -> Result<Option<u64>, Error> {
    let value = contents.trim();
    if value == "max" {
        return Ok(None);
    }
    let limit = parse_u64("cgroup memory limit", value)?;
    Ok((limit < CGROUP_V1_UNLIMITED && limit <= mem_total_bytes).then_some(limit))
}

/// Inactive file cache from a cgroup `memory.stat`: `total_inactive_file`
/// (hierarchical, v1; falling back to `inactive_file`) or `inactive_file` (v2).
///
/// The kernel reclaims this first, so subtracting it from usage gives the
/// working set, as docker and kubernetes report it. `None` if the key is
/// missing or malformed.
pub fn parse_inactive_file(contents: &str, v1: bool) -> Option<u64> {
    let field = |name: &str| {
        contents.lines().find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            if key == name {
                value.trim().parse().ok()
            } else {
                None
            }
        })
    };
    if v1 {
        field("total_inactive_file").or_else(|| field("inactive_file"))
    } else {
        field("inactive_file")
    }
}

/// Parse `/proc/pressure/memory`, returning the `some` and `full` avg10 values.
pub fn parse_psi(contents: &str) -> Result<Psi, Error> {
    let avg10 = |kind: &str| -> Result<f64, Error> {
        let value = contents
            .lines()
            .filter_map(|line| line.strip_prefix(kind)?.strip_prefix(' '))
            .flat_map(str::split_whitespace)
            .find_map(|kv| kv.strip_prefix("avg10="))
            .ok_or_else(|| Error::parse(PSI_MEMORY, format!("missing {kind} avg10")))?;
        value
            .parse::<f64>()
            .map_err(|e| Error::parse(PSI_MEMORY, format!("{kind} avg10: {e}")))
    };
    Ok(Psi {
        some_avg10: avg10("some")?,
        full_avg10: avg10("full")?,
    })
}

fn parse_u64(what: &'static str, value: &str) -> Result<u64, Error> {
    value
        .trim()
        .parse()
        .map_err(|e| Error::parse(what, format!("{value:?}: {e}")))
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

/// Like [`read`], but a missing file is `Ok(None)`.
fn read_if_exists(path: &Path) -> Result<Option<String>, Error> {
    match fs::read_to_string(path) {
        Ok(contents) => Ok(Some(contents)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The process's cgroup directory under `mount`. Without a cgroup namespace a
/// container sees its host-side path (e.g. `/docker/<id>`) but has its own
/// cgroup mounted at the root, so fall back to the mount root.
fn cgroup_dir(mount: &str, path: &str) -> PathBuf {
    let dir = Path::new(mount).join(path.trim_start_matches('/'));
    if dir.is_dir() {
        dir
    } else {
        PathBuf::from(mount)
    }
}

/// Limit and working set (usage minus inactive file cache) of the process's
/// own memory cgroup, if it has a limit.
fn read_cgroup(mem_total_bytes: u64) -> Result<Option<CgroupMemory>, Error> {
    let Some(self_cgroup) = read_if_exists(Path::new(SELF_CGROUP))? else {
        return Ok(None);
    };
    let (dir, limit_file, usage_file, v1) = match parse_self_cgroup(&self_cgroup) {
        Some(CgroupPath::V1(path)) => (
            cgroup_dir(CGROUP_V1_MEMORY_MOUNT, path),
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            true,
        ),
        Some(CgroupPath::V2(path)) => (
            cgroup_dir(CGROUP_V2_MOUNT, path),
            "memory.max",
            "memory.current",
            false,
        ),
        None => return Ok(None),
    };
    let Some(limit) = read_if_exists(&dir.join(limit_file))? else {
        return Ok(None);
    };
    let Some(limit_bytes) = parse_cgroup_limit(&limit, mem_total_bytes)? else {
        return Ok(None);
    };
    let usage_bytes = parse_u64("cgroup memory usage", &read(&dir.join(usage_file))?)?;
    let inactive_file = read_if_exists(&dir.join("memory.stat"))?
        .and_then(|stat| parse_inactive_file(&stat, v1))
        .unwrap_or(0);
    let usage_bytes = usage_bytes.saturating_sub(inactive_file);
    Ok(Some(CgroupMemory {
        limit_bytes,
        usage_bytes,
    }))
}

/// Take a memory snapshot of this host as seen by the current process.
pub fn snapshot() -> Result<MemorySnapshot, Error> {
    let meminfo = parse_meminfo(&read(Path::new(MEMINFO))?)?;
    let cgroup = read_cgroup(meminfo.total_bytes)?;
    // PSI needs CONFIG_PSI and may be disabled at boot (psi=0): then it is simply unknown.
    let psi = match fs::read_to_string(PSI_MEMORY) {
        Ok(contents) => Some(parse_psi(&contents)?),
        Err(_) => None,
    };
    Ok(MemorySnapshot {
        platform: "linux",
        total_bytes: meminfo.total_bytes,
        available_bytes: meminfo.available_bytes,
        used_bytes: meminfo.total_bytes.saturating_sub(meminfo.available_bytes),
        swap_used_bytes: meminfo
            .swap_total_bytes
            .saturating_sub(meminfo.swap_free_bytes),
        cgroup,
        psi,
        assessment: assess(meminfo.total_bytes, meminfo.available_bytes, cgroup, psi),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO_SAMPLE: &str = "\
MemTotal:       24684096 kB
MemFree:        20684132 kB
MemAvailable:   24221012 kB
Buffers:           23040 kB
SwapCached:            0 kB
SwapTotal:       2097148 kB
SwapFree:        1048572 kB
Hugepagesize:       2048 kB
";

    #[test]
    fn meminfo_in_bytes() {
        let m = parse_meminfo(MEMINFO_SAMPLE).expect("valid meminfo");
        assert_eq!(m.total_bytes, 24_684_096 * 1024);
        assert_eq!(m.available_bytes, 24_221_012 * 1024);
        assert_eq!(m.swap_total_bytes, 2_097_148 * 1024);
        assert_eq!(m.swap_free_bytes, 1_048_572 * 1024);
    }

    #[test]
    fn meminfo_missing_or_bad_field() {
        let missing = MEMINFO_SAMPLE.replace("MemAvailable", "Nope");
        assert!(matches!(
            parse_meminfo(&missing),
            Err(Error::Parse { detail, .. }) if detail.contains("MemAvailable")
        ));
        let bad = MEMINFO_SAMPLE.replace("24684096", "lots");
        assert!(parse_meminfo(&bad).is_err());
    }

    #[test]
    fn self_cgroup_v2() {
        assert_eq!(
            parse_self_cgroup("0::/user.slice/user-1000.slice/session-2.scope\n"),
            Some(CgroupPath::V2(
                "/user.slice/user-1000.slice/session-2.scope"
            ))
        );
        assert_eq!(parse_self_cgroup("0::/\n"), Some(CgroupPath::V2("/")));
    }

    #[test]
    fn self_cgroup_v1_wins_on_hybrid() {
        let hybrid = "\
9:name=systemd:/
5:devices:/
4:memory:/process_api/1415de15
3:cpu,cpuacct:/
0::/
";
        assert_eq!(
            parse_self_cgroup(hybrid),
            Some(CgroupPath::V1("/process_api/1415de15"))
        );
        assert_eq!(
            parse_self_cgroup("7:cpuset,memory:/docker/a:b\n"),
            Some(CgroupPath::V1("/docker/a:b"))
        );
    }

    #[test]
    fn self_cgroup_without_memory() {
        assert_eq!(parse_self_cgroup("2:cpu:/\n1:name=systemd:/\n"), None);
        assert_eq!(parse_self_cgroup(""), None);
    }

    #[test]
    fn cgroup_limits() {
        let host = 16 << 30;
        assert_eq!(parse_cgroup_limit("max\n", host).ok(), Some(None));
        assert_eq!(
            parse_cgroup_limit("2147483648\n", host).ok(),
            Some(Some(2 << 30))
        );
        assert_eq!(
            parse_cgroup_limit("9223372036854771712\n", host).ok(),
            Some(None)
        );
        assert_eq!(parse_cgroup_limit("34359738368", host).ok(), Some(None));
        assert!(parse_cgroup_limit("lots", host).is_err());
    }

    const CGROUP_V1_STAT_SAMPLE: &str = "\
cache 1073741824
rss 104857600
inactive_file 536870912
active_file 268435456
hierarchical_memory_limit 2147483648
total_cache 1610612736
total_rss 209715200
total_inactive_file 805306368
total_active_file 402653184
";

    const CGROUP_V2_STAT_SAMPLE: &str = "\
anon 104857600
file 1073741824
inactive_anon 0
active_anon 104857600
inactive_file 805306368
active_file 268435456
workingset_refault_file 0
";

    #[test]
    fn cgroup_inactive_file_v1() {
        assert_eq!(
            parse_inactive_file(CGROUP_V1_STAT_SAMPLE, true),
            Some(805_306_368)
        );
        let local_only = CGROUP_V1_STAT_SAMPLE.replace("total_inactive_file", "total_nope");
        assert_eq!(parse_inactive_file(&local_only, true), Some(536_870_912));
    }

    #[test]
    fn cgroup_inactive_file_v2() {
        assert_eq!(
            parse_inactive_file(CGROUP_V2_STAT_SAMPLE, false),
            Some(805_306_368)
        );
        // v2 has no total_ prefix: a stray total_inactive_file is not used.
        assert_eq!(
            parse_inactive_file("total_inactive_file 1\ninactive_file 2\n", false),
            Some(2)
        );
    }

    #[test]
    fn cgroup_inactive_file_missing_or_bad() {
        assert_eq!(parse_inactive_file("", true), None);
        assert_eq!(parse_inactive_file("anon 1\nactive_file 2\n", false), None);
        assert_eq!(parse_inactive_file("inactive_file lots\n", false), None);
    }

    #[test]
    fn psi_avg10() {
        let psi = parse_psi(
            "some avg10=12.50 avg60=3.00 avg300=0.50 total=123\n\
             full avg10=0.75 avg60=0.10 avg300=0.00 total=45\n",
        )
        .expect("valid psi");
        assert_eq!(psi.some_avg10, 12.5);
        assert_eq!(psi.full_avg10, 0.75);
    }

    #[test]
    fn psi_malformed() {
        assert!(parse_psi("some avg10=1.00 avg60=0.00 avg300=0.00 total=0\n").is_err());
        assert!(parse_psi("some avg10=x\nfull avg10=0.00\n").is_err());
    }
}
