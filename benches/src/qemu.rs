//! QEMU's qcow2 as a target, through `qemu-img bench` (timing) and
//! `strace` (flush and write counts), each in its own run so that tracing
//! does not slow the timed one.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use qj_engine::CacheMode;

use crate::workload::Workload;

/// What one `qemu-img bench` run measured.
#[derive(Debug, Clone, Default)]
pub struct QemuSample {
    /// Requests sent.
    pub ops: u64,
    /// Wall time qemu-img reported.
    pub elapsed: Duration,
}

/// Flush and write counts from a traced run.
#[derive(Debug, Clone, Copy, Default)]
pub struct QemuCounts {
    /// Requests in the traced run.
    pub ops: u64,
    /// fdatasync + fsync calls.
    pub flushes: u64,
    /// Bytes passed to pwrite-family calls.
    pub bytes_written: u64,
}

/// Whether `qemu-img` runs here.
pub fn qemu_img_available() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether `strace` runs here.
pub fn strace_available() -> bool {
    Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("")
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates the image a workload needs: empty for allocating workloads,
/// with every cluster the workload touches already written otherwise.
pub fn prepare(
    path: &Path,
    workload: Workload,
    ops: u64,
    cluster_size: u64,
    virtual_size: u64,
    create_options: &str,
) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let mut options = format!("cluster_size={cluster_size}");
    if !create_options.is_empty() {
        options.push(',');
        options.push_str(create_options);
    }
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(options)
        .arg(path)
        .arg(virtual_size.to_string()))?;
    if !workload.allocates() {
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -P 0x5a 0 {}", ops * cluster_size))
            .arg(path))?;
    }
    Ok(())
}

/// QEMU's cache mode for a workload run in `cache`: a synced workload
/// flushes after every request, which `qemu-img bench` spells as a
/// writethrough mode (directsync with O_DIRECT).
fn qemu_cache(workload: Workload, cache: CacheMode) -> &'static str {
    match (workload.synced(), cache) {
        (true, CacheMode::Writeback | CacheMode::Writethrough) => "writethrough",
        (true, CacheMode::None | CacheMode::Directsync) => "directsync",
        (false, mode) => mode.name(),
    }
}

fn bench_args(
    workload: Workload,
    ops: u64,
    cluster_size: u64,
    threads: usize,
    cache: CacheMode,
) -> Vec<String> {
    let mut a: Vec<String> = vec!["bench".into(), "-f".into(), "qcow2".into()];
    if workload != Workload::Read {
        a.push("-w".into());
    }
    let cache = qemu_cache(workload, cache);
    let size = workload.request_bytes(cluster_size);
    a.extend([
        "-t".into(),
        cache.into(),
        "-d".into(),
        threads.to_string(),
        "-c".into(),
        ops.to_string(),
        "-s".into(),
        size.to_string(),
        "-S".into(),
        cluster_size.to_string(),
    ]);
    a
}

/// Runs `qemu-img bench` on a prepared image and parses its timing.
pub fn bench(
    path: &Path,
    workload: Workload,
    ops: u64,
    cluster_size: u64,
    threads: usize,
    cache: CacheMode,
) -> Result<QemuSample, String> {
    let out = run(Command::new("qemu-img")
        .args(bench_args(workload, ops, cluster_size, threads, cache))
        .arg(path))?;
    let secs = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")
                .and_then(|r| r.strip_suffix(" seconds."))
        })
        .and_then(|s| s.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("cannot parse qemu-img bench output: {out:?}"))?;
    Ok(QemuSample {
        ops,
        elapsed: Duration::from_secs_f64(secs),
    })
}

/// Runs `qemu-img bench` under strace and counts flushes and written bytes.
pub fn traced_counts(
    path: &Path,
    workload: Workload,
    ops: u64,
    cluster_size: u64,
    threads: usize,
    cache: CacheMode,
) -> Result<QemuCounts, String> {
    let trace = path.with_extension("strace");
    run(Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=fdatasync,fsync,pwrite64,pwritev,pwritev2",
            "-e",
            "abbrev=all",
            "-o",
        ])
        .arg(&trace)
        .arg("qemu-img")
        .args(bench_args(workload, ops, cluster_size, threads, cache))
        .arg(path))?;
    let text =
        std::fs::read_to_string(&trace).map_err(|e| format!("reading {}: {e}", trace.display()))?;
    let _ = std::fs::remove_file(&trace);
    let mut counts = QemuCounts {
        ops,
        ..QemuCounts::default()
    };
    for line in text.lines() {
        if line.contains("fdatasync(") || line.contains("fsync(") {
            counts.flushes += 1;
        } else if line.contains("pwrite") {
            // The return value after '=' is the byte count.
            if let Some(n) = line
                .rsplit('=')
                .next()
                .and_then(|r| r.trim().split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
            {
                counts.bytes_written += n;
            }
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value after `flag` in an argument list.
    fn value<'a>(args: &'a [String], flag: &str) -> &'a str {
        let at = args.iter().position(|a| a == flag).expect(flag);
        &args[at + 1]
    }

    #[test]
    fn qemu_requests_are_as_large_as_ours() {
        for (workload, bytes) in [
            (Workload::AllocSync4k, "4096"),
            (Workload::AllocSyncCluster, "65536"),
            (Workload::Dedup90Sync, "65536"),
            (Workload::Dedup50, "65536"),
        ] {
            let args = bench_args(workload, 10, 65536, 1, CacheMode::Writeback);
            assert_eq!(value(&args, "-s"), bytes, "{workload}");
            let cache = if workload.synced() {
                "writethrough"
            } else {
                "writeback"
            };
            assert_eq!(value(&args, "-t"), cache, "{workload}");
        }
    }
}
