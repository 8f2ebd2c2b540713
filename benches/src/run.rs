//! Running the comparison: every (workload, thread count, target) cell is
//! measured in several rounds, interleaved, and the rounds are summed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qj_engine::CacheMode;

use crate::content::DuplicateStream;
use crate::latency::Latencies;
use crate::qemu;
use crate::report::{build_rows, BenchRow, Cell};
use crate::target::{BenchDisk, DedupCounts, EngineDisk, RawDisk, TargetKind};
use crate::workload::Workload;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Directory for the temporary images.
    pub dir: PathBuf,
    /// Workloads to run.
    pub workloads: Vec<Workload>,
    /// Targets to compare.
    pub targets: Vec<TargetKind>,
    /// Thread counts for `threads-sync`.
    pub threads: Vec<usize>,
    /// Operations per round for synced workloads (per thread count).
    pub sync_ops: u64,
    /// Operations per round for the others.
    pub batch_ops: u64,
    /// Interleaved rounds.
    pub rounds: u32,
    /// Cluster size of every image.
    pub cluster_size: u64,
    /// Cache mode of every target, as QEMU names it (`-t`).
    pub cache: CacheMode,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            dir: std::env::temp_dir(),
            workloads: Workload::ALL.to_vec(),
            targets: TargetKind::ALL.to_vec(),
            threads: vec![1, 2, 4, 8, 16],
            sync_ops: 250,
            batch_ops: 2000,
            rounds: 2,
            cluster_size: 65536,
            cache: CacheMode::Writeback,
        }
    }
}

/// Where a run is, for a progress bar.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Cells finished.
    pub done: usize,
    /// Cells in all.
    pub total: usize,
    /// What is running now.
    pub label: String,
}

fn thread_counts(w: Workload, opts: &BenchOptions) -> Vec<usize> {
    if w == Workload::ThreadsSync {
        opts.threads.clone()
    } else {
        vec![1]
    }
}

fn ops_for(w: Workload, opts: &BenchOptions) -> u64 {
    if w.synced() {
        opts.sync_ops
    } else {
        opts.batch_ops
    }
}

/// Runs the comparison and returns one row per (workload, threads, target).
pub fn run_bench(
    opts: &BenchOptions,
    progress: &dyn Fn(&Progress),
) -> Result<Vec<BenchRow>, String> {
    if opts.threads.contains(&0) {
        return Err("a thread count of 0 is not valid".into());
    }
    if opts.cluster_size < 4096 || !opts.cluster_size.is_power_of_two() {
        return Err(format!(
            "cluster size {} must be a power of two of at least 4096",
            opts.cluster_size
        ));
    }
    std::fs::create_dir_all(&opts.dir)
        .map_err(|e| format!("creating {}: {e}", opts.dir.display()))?;
    let qemu_ok = qemu::qemu_img_available();
    let strace_ok = qemu::strace_available();
    let mut cells: BTreeMap<(usize, usize, TargetKind), Cell> = BTreeMap::new();
    let plan: Vec<(usize, Workload, usize, TargetKind)> = opts
        .workloads
        .iter()
        .enumerate()
        .flat_map(|(wi, &w)| {
            thread_counts(w, opts)
                .into_iter()
                .flat_map(move |t| opts.targets.iter().map(move |&k| (wi, w, t, k)))
        })
        .collect();
    let total = plan.len() * opts.rounds as usize;
    let mut done = 0;
    for round in 0..opts.rounds {
        for &(wi, w, threads, target) in &plan {
            progress(&Progress {
                done,
                total,
                label: format!("{w} {threads}t {target} (round {})", round + 1),
            });
            let cell = cells
                .entry((wi, threads, target))
                .or_insert_with(|| Cell::new(w, target, threads, opts.cluster_size));
            let ops = ops_for(w, opts);
            let path = opts.dir.join(format!(
                "qj-bench-{}-{}-{}.img",
                w.name(),
                threads,
                target.name()
            ));
            match target {
                TargetKind::Qemu | TargetKind::QemuLazy | TargetKind::QemuPrealloc if !qemu_ok => {
                    cell.note = Some("qemu-img not found".into())
                }
                TargetKind::Qemu | TargetKind::QemuLazy | TargetKind::QemuPrealloc => {
                    let r = run_qemu(
                        &path,
                        target,
                        w,
                        ops,
                        threads,
                        opts,
                        round == 0 && strace_ok,
                    );
                    match r {
                        Ok(QemuRun {
                            sample,
                            counts,
                            file_bytes,
                        }) => {
                            cell.ops += sample.ops;
                            cell.elapsed += sample.elapsed;
                            cell.record_round(sample.ops, Some(file_bytes));
                            if let Some(c) = counts {
                                cell.counted_ops += c.ops;
                                cell.flushes += c.flushes;
                                cell.bytes_written += c.bytes_written;
                            } else if !strace_ok {
                                cell.note = Some("strace not found: no flush counts".into());
                            }
                            if cell.note.is_none() {
                                cell.note = Some("qemu-img bench: no per-op latency".into());
                            }
                        }
                        Err(e) => cell.note = Some(e),
                    }
                }
                _ => match run_in_process(
                    target,
                    &path,
                    w,
                    ops,
                    threads,
                    opts.cluster_size,
                    opts.cache,
                ) {
                    Ok(m) => {
                        cell.record_round(m.ops, m.file_bytes);
                        if let Some(d) = m.dedup {
                            cell.dedup = Some(cell.dedup.unwrap_or_default().plus(&d));
                        }
                        cell.ops += m.ops;
                        cell.counted_ops += m.ops;
                        cell.elapsed += m.elapsed;
                        cell.flushes += m.flushes;
                        cell.bytes_written += m.bytes_written;
                        cell.latencies.merge(m.latencies);
                    }
                    Err(e) => cell.note = Some(e),
                },
            }
            let _ = std::fs::remove_file(&path);
            done += 1;
        }
    }
    progress(&Progress {
        done,
        total,
        label: "done".into(),
    });
    Ok(build_rows(cells.into_values().collect()))
}

/// The length of the file at `path`.
fn file_len(path: &std::path::Path) -> Result<u64, String> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| format!("stat {}: {e}", path.display()))
}

/// What one run of a QEMU target measured.
struct QemuRun {
    sample: qemu::QemuSample,
    /// From the traced run, if there was one.
    counts: Option<qemu::QemuCounts>,
    /// The image's length before and after the timed run.
    file_bytes: (u64, u64),
}

/// One run of a QEMU target; `trace` adds a short strace run that counts
/// flushes and bytes.
fn run_qemu(
    path: &std::path::Path,
    target: TargetKind,
    w: Workload,
    ops: u64,
    threads: usize,
    opts: &BenchOptions,
    trace: bool,
) -> Result<QemuRun, String> {
    let (cs, cache) = (opts.cluster_size, opts.cache);
    let create_options = target.qemu_create_options().unwrap_or("");
    let vsize = virtual_size(ops, cs);
    qemu::prepare(path, w, ops, cs, vsize, create_options)?;
    let file_bytes_start = file_len(path)?;
    let sample = qemu::bench(path, w, ops, cs, threads, cache)?;
    let file_bytes = (file_bytes_start, file_len(path)?);
    let counts = if trace {
        // A short traced run on a fresh image: strace slows QEMU, so it is
        // never the timed run.
        let traced_ops = ops.min(200);
        qemu::prepare(path, w, traced_ops, cs, vsize, create_options)?;
        Some(qemu::traced_counts(
            path, w, traced_ops, cs, threads, cache,
        )?)
    } else {
        None
    };
    Ok(QemuRun {
        sample,
        counts,
        file_bytes,
    })
}

fn virtual_size(ops: u64, cs: u64) -> u64 {
    (ops * cs).max(1 << 30)
}

/// What one in-process run measured.
struct Measured {
    ops: u64,
    elapsed: Duration,
    latencies: Latencies,
    flushes: u64,
    bytes_written: u64,
    /// The image's length before the measured operations and after its
    /// clean close; `None` for a raw file (its length is the disk size).
    file_bytes: Option<(u64, u64)>,
    /// What deduplication did during the measured operations.
    dedup: Option<DedupCounts>,
}

fn run_in_process(
    target: TargetKind,
    path: &std::path::Path,
    w: Workload,
    ops: u64,
    threads: usize,
    cs: u64,
    cache: CacheMode,
) -> Result<Measured, String> {
    let vsize = virtual_size(ops, cs);
    // The engine disk is kept by its own type too, to be closed (not just
    // dropped) before its file is measured.
    let engine_disk = match target {
        TargetKind::Raw => None,
        _ => Some(Arc::new(
            EngineDisk::create(target, path, vsize, cs, cache).map_err(|e| e.to_string())?,
        )),
    };
    let disk: Arc<dyn BenchDisk> = match &engine_disk {
        Some(engine) => engine.clone(),
        None => Arc::new(RawDisk::create(path, vsize, cache).map_err(|e| e.to_string())?),
    };
    let small = vec![0x3cu8; 4096];
    if !w.allocates() {
        for i in 0..ops {
            disk.write(&small, i * cs).map_err(|e| e.to_string())?;
        }
        disk.flush().map_err(|e| e.to_string())?;
    }
    disk.before_measure().map_err(|e| e.to_string())?;
    let file_bytes_start = match engine_disk {
        Some(_) => Some(file_len(path)?),
        None => None,
    };
    let (flushes0, bytes0) = disk.device_counts();
    let dedup0 = disk.dedup_counts();
    let request_bytes = usize::try_from(w.request_bytes(cs)).map_err(|e| e.to_string())?;
    let payload = vec![0xa5u8; request_bytes];
    let started = Instant::now();
    let per_thread = ops / threads as u64;
    let results: Vec<Result<Latencies, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads as u64)
            .map(|t| {
                let disk = disk.clone();
                let payload = &payload;
                s.spawn(move || -> Result<Latencies, String> {
                    let mut lat = Latencies::default();
                    let mut buf = vec![0u8; 4096];
                    let mut repeats = w
                        .duplicate_percent()
                        .map(|p| DuplicateStream::new(request_bytes, p));
                    for i in 0..per_thread {
                        let offset = (t * per_thread + i) * cs;
                        // Making the next content only stamps its id, so
                        // it may sit inside the timed loop.
                        let data: &[u8] = match &mut repeats {
                            Some(stream) => stream.next_write().0,
                            None => payload,
                        };
                        let t0 = Instant::now();
                        match w {
                            Workload::Read => disk.read(&mut buf, offset),
                            _ => disk.write(data, offset),
                        }
                        .map_err(|e| e.to_string())?;
                        if w.synced() {
                            disk.flush().map_err(|e| e.to_string())?;
                        }
                        lat.record(t0.elapsed().as_nanos() as u64);
                    }
                    Ok(lat)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into())))
            .collect()
    });
    if !w.synced() && w != Workload::Read {
        disk.flush().map_err(|e| e.to_string())?;
    }
    let elapsed = started.elapsed();
    let mut latencies = Latencies::default();
    for r in results {
        latencies.merge(r?);
    }
    let (flushes1, bytes1) = disk.device_counts();
    let dedup = disk
        .dedup_counts()
        .zip(dedup0)
        .map(|(d1, d0)| d1.since(&d0));
    drop(disk);
    let file_bytes = match engine_disk {
        Some(engine) => {
            Arc::try_unwrap(engine)
                .map_err(|_| "the image is still in use after the run".to_string())?
                .close()
                .map_err(|e| format!("closing {}: {e}", path.display()))?;
            file_bytes_start.zip(Some(file_len(path)?))
        }
        None => None,
    };
    Ok(Measured {
        ops: per_thread * threads as u64,
        elapsed,
        latencies,
        flushes: flushes1 - flushes0,
        bytes_written: bytes1 - bytes0,
        file_bytes,
        dedup,
    })
}
