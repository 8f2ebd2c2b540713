//! `qj demo`: a short tour of the engine in a temporary directory. It
//! creates an image, writes a deterministic mix of patterns, zeroes and
//! discards with periodic flushes, closes and reopens it, verifies every
//! byte against a model of what was written, checks it with our checker
//! and with `qemu-img check` when installed, and prints the engine's flush
//! and metadata statistics.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use qj_engine::check::{check, RepairMode};
use qj_engine::{CreateOptions, FileStorage, Image, OpenOptions, Stats};

use crate::error::{engine, io, quoted, CliError, CliResult, EXIT_FAILED};
use crate::human::size_to_str;

/// The demo image: 64 MiB in 64 KiB clusters.
const VIRTUAL_SIZE_BYTES: u64 = 64 << 20;
const CLUSTER_SIZE_BYTES: u64 = 64 << 10;
/// Granularity of the model of the guest disk: every write covers whole
/// blocks of this size, each filled with one byte value.
const BLOCK_BYTES: u64 = 4 << 10;
const BLOCKS: usize = (VIRTUAL_SIZE_BYTES / BLOCK_BYTES) as usize;
/// Guest writes in the demo, with a flush every `FLUSH_EVERY`.
const WRITES: u64 = 400;
const FLUSH_EVERY: u64 = 50;

/// Arguments of `qj demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the image in this directory instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    keep_in: Option<std::path::PathBuf>,
}

/// A small deterministic generator (xorshift64*), so that every run of the
/// demo does the same work.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        self.next() % n
    }
}

/// What the guest should read: one byte value per block (0 for zeros).
struct Model {
    blocks: Vec<u8>,
}

impl Model {
    fn set(&mut self, offset: u64, len: u64, value: u8) {
        let first = (offset / BLOCK_BYTES) as usize;
        let count = (len / BLOCK_BYTES) as usize;
        self.blocks[first..first + count].fill(value);
    }
}

/// What the write phase did.
struct Workload {
    bytes_written: u64,
    zeroed: u64,
    discarded: u64,
    stats: Stats,
    elapsed_s: f64,
}

fn run_workload(image: &Image, model: &mut Model) -> CliResult<Workload> {
    let started = Instant::now();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut bytes_written, mut zeroed, mut discarded) = (0, 0, 0);
    let clusters = VIRTUAL_SIZE_BYTES / CLUSTER_SIZE_BYTES;
    let blocks_per_cluster = CLUSTER_SIZE_BYTES / BLOCK_BYTES;
    for i in 0..WRITES {
        let cluster = rng.below(clusters);
        let first_block = rng.below(blocks_per_cluster);
        let block_count = 1 + rng.below(blocks_per_cluster - first_block);
        let offset = cluster * CLUSTER_SIZE_BYTES + first_block * BLOCK_BYTES;
        let len = block_count * BLOCK_BYTES;
        match i % 10 {
            // One request in ten zeroes, one discards a whole cluster.
            8 => {
                image
                    .write_zeroes(offset, len)
                    .map_err(engine("demo: zeroing"))?;
                model.set(offset, len, 0);
                zeroed += len;
            }
            9 => {
                let start = cluster * CLUSTER_SIZE_BYTES;
                image
                    .discard(start, CLUSTER_SIZE_BYTES)
                    .map_err(engine("demo: discarding"))?;
                model.set(start, CLUSTER_SIZE_BYTES, 0);
                discarded += CLUSTER_SIZE_BYTES;
            }
            _ => {
                let value = (i % 255 + 1) as u8;
                let buf = vec![value; len as usize];
                image.write(&buf, offset).map_err(engine("demo: writing"))?;
                model.set(offset, len, value);
                bytes_written += len;
            }
        }
        if (i + 1) % FLUSH_EVERY == 0 {
            image.flush().map_err(engine("demo: flushing"))?;
        }
    }
    image.flush().map_err(engine("demo: flushing"))?;
    Ok(Workload {
        bytes_written,
        zeroed,
        discarded,
        stats: image.stats(),
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

/// Reads the whole disk back; returns the number of blocks that differ
/// from the model.
fn verify(image: &Image, model: &Model) -> CliResult<usize> {
    let mut buf = vec![0u8; CLUSTER_SIZE_BYTES as usize];
    let mut wrong = 0;
    let blocks_per_cluster = (CLUSTER_SIZE_BYTES / BLOCK_BYTES) as usize;
    for (c, expected) in model.blocks.chunks(blocks_per_cluster).enumerate() {
        let offset = c as u64 * CLUSTER_SIZE_BYTES;
        image
            .read(&mut buf, offset)
            .map_err(engine(format!("demo: reading back at {offset}")))?;
        for (block, &value) in buf.chunks(BLOCK_BYTES as usize).zip(expected) {
            if block.iter().any(|&b| b != value) {
                wrong += 1;
            }
        }
    }
    Ok(wrong)
}

/// `qemu-img check`'s exit status and summary line, or why it did not run.
fn qemu_img_check(path: &Path) -> Result<(i32, String), String> {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .map_err(|e| format!("not run ({e})"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string();
    Ok((out.status.code().unwrap_or(-1), summary))
}

fn demo_in(dir: &Path) -> CliResult<u8> {
    let path = dir.join("demo.qcow2");
    let opts = CreateOptions {
        virtual_size: VIRTUAL_SIZE_BYTES,
        cluster_size: CLUSTER_SIZE_BYTES,
        ..CreateOptions::default()
    };
    Image::create_path(&path, &opts).map_err(engine(format!("creating {}", quoted(&path))))?;
    println!(
        "qj demo: {} ({} virtual, {} clusters, {}-bit refcounts, flush-ordering backend)",
        path.display(),
        size_to_str(VIRTUAL_SIZE_BYTES),
        size_to_str(CLUSTER_SIZE_BYTES),
        opts.refcount_bits
    );

    let image = Image::open_path(&path, &OpenOptions::read_write())
        .map_err(engine(format!("opening {}", quoted(&path))))?;
    let mut model = Model {
        blocks: vec![0; BLOCKS],
    };
    let work = run_workload(&image, &mut model)?;
    image.close().map_err(engine("demo: closing"))?;
    let s = &work.stats;
    println!(
        "  wrote {} requests in {:.2} s: {} of patterns, {} zeroed, {} discarded",
        WRITES,
        work.elapsed_s,
        size_to_str(work.bytes_written),
        size_to_str(work.zeroed),
        size_to_str(work.discarded)
    );
    println!(
        "  engine: {} flushes, {} metadata writes ({}), {} data writes ({}), {} clusters allocated, {} freed",
        s.flushes,
        s.metadata_writes,
        size_to_str(s.metadata_bytes),
        s.data_writes,
        size_to_str(s.data_bytes),
        s.clusters_allocated,
        s.clusters_freed
    );
    if s.guest_ops > 0 {
        println!(
            "  per guest operation: {:.3} flushes, {:.3} metadata writes",
            s.flushes as f64 / s.guest_ops as f64,
            s.metadata_writes as f64 / s.guest_ops as f64
        );
    }

    let reopened = Image::open_path(&path, &OpenOptions::read_only())
        .map_err(engine(format!("reopening {}", quoted(&path))))?;
    let wrong = verify(&reopened, &model)?;
    drop(reopened);
    println!(
        "  reopened and read back {}: {}",
        size_to_str(VIRTUAL_SIZE_BYTES),
        if wrong == 0 {
            "every byte as written".to_string()
        } else {
            format!("{wrong} blocks of 4 KiB differ from what was written")
        }
    );

    let storage =
        FileStorage::open(&path, false).map_err(io(format!("opening {}", quoted(&path))))?;
    let report = check(&storage, RepairMode::None, &[]).map_err(|source| CliError::Check {
        what: format!("checking {}", quoted(&path)),
        source,
    })?;
    println!(
        "  qj check: {} corruptions, {} leaks, {} check errors; {}/{} clusters allocated, image end {}",
        report.corruptions,
        report.leaks,
        report.check_errors,
        report.allocated_clusters,
        report.total_clusters,
        size_to_str(report.image_end_offset)
    );
    let qemu_ok = match qemu_img_check(&path) {
        Ok((code, summary)) => {
            println!("  qemu-img check: exit {code}: {summary}");
            code == 0
        }
        Err(why) => {
            println!("  qemu-img check: {why}");
            true
        }
    };
    let ok = wrong == 0 && report.is_clean() && qemu_ok;
    println!(
        "  result: {}",
        if ok { "consistent" } else { "PROBLEMS FOUND" }
    );
    Ok(if ok { 0 } else { EXIT_FAILED })
}

/// Runs `qj demo`.
pub fn run(args: DemoArgs) -> CliResult<u8> {
    match &args.keep_in {
        Some(dir) => demo_in(dir),
        None => {
            let dir = tempfile::tempdir().map_err(io("creating a temporary directory"))?;
            demo_in(dir.path())
        }
    }
}
