//! The content checks of a recovered disk: (b) every sector holds an
//! allowed content, (c) nothing a completed flush made durable is lost, and
//! the comparison behind (d).

use crate::guest_model::{GuestModel, Observed, SectorVerdict};
use crate::medium::SECTOR_BYTES;
use crate::sector_pattern::{decode, Content, Decoded};
use crate::target::GuestDisk;
use crate::violation::CheckKind;

/// Bytes read per guest request while checking.
const READ_CHUNK_BYTES: u64 = 64 * 1024;

/// A failed content check: which check and what exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentProblem {
    /// The check.
    pub kind: CheckKind,
    /// Sector, what it read, what was allowed.
    pub detail: String,
}

fn describe(decoded: Decoded) -> String {
    match decoded {
        Decoded::Content(content) => content.to_string(),
        Decoded::Misplaced { id, sector_found } => {
            format!("write #{id}'s data for sector {sector_found}")
        }
        Decoded::Garbage => "bytes no write produced".to_string(),
    }
}

/// Reads the whole disk and judges every sector against `model`. Returns
/// what the disk showed, or the first problem (with the count of bad
/// sectors).
pub fn observe(disk: &dyn GuestDisk, model: &GuestModel) -> Result<Observed, ContentProblem> {
    let size_bytes = disk.size_bytes();
    if !model.size_allowed(size_bytes) {
        return Err(ContentProblem {
            kind: CheckKind::NotAllowed,
            detail: format!(
                "disk size {size_bytes} bytes, allowed sizes {:?}",
                model.allowed_sizes()
            ),
        });
    }
    let sectors = size_bytes / SECTOR_BYTES;
    let mut contents = Vec::with_capacity(usize::try_from(sectors).unwrap_or(0));
    let mut buf = vec![0u8; READ_CHUNK_BYTES as usize];
    let mut first_problem: Option<ContentProblem> = None;
    let mut bad_sectors = 0u64;
    let mut offset = 0u64;
    // Bounded by the disk size, which the model bounds.
    while offset < size_bytes {
        let n = (size_bytes - offset).min(READ_CHUNK_BYTES) as usize;
        if let Err(error) = disk.read(&mut buf[..n], offset) {
            return Err(ContentProblem {
                kind: CheckKind::NotAllowed,
                detail: format!("reading {n} bytes at guest offset {offset} failed: {error}"),
            });
        }
        for (i, sector_bytes) in buf[..n].chunks_exact(SECTOR_BYTES as usize).enumerate() {
            let sector = offset / SECTOR_BYTES + i as u64;
            let decoded = decode(sector_bytes, sector);
            let verdict = model.check_sector(sector, decoded);
            if verdict != SectorVerdict::Allowed {
                bad_sectors += 1;
                if first_problem.is_none() {
                    first_problem = Some(ContentProblem {
                        kind: if verdict == SectorVerdict::FlushedDataLost {
                            CheckKind::FlushedDataLost
                        } else {
                            CheckKind::NotAllowed
                        },
                        detail: format!(
                            "guest sector {sector} (byte {}) reads {}; allowed: {}",
                            sector * SECTOR_BYTES,
                            describe(decoded),
                            model.describe_allowed(sector)
                        ),
                    });
                }
            }
            contents.push(match decoded {
                Decoded::Content(content) => content,
                // Unreachable after a problem is recorded; keep a stand-in.
                _ => Content::Zero,
            });
        }
        offset += n as u64;
    }
    if let Some(mut problem) = first_problem {
        if bad_sectors > 1 {
            problem
                .detail
                .push_str(&format!(" ({bad_sectors} bad sectors in all)"));
        }
        return Err(problem);
    }
    Ok(Observed {
        size_bytes,
        contents,
    })
}

/// Compares the guest content after two recoveries of the same crash (d).
pub fn compare_recoveries(first: &Observed, second: &Observed) -> Result<(), ContentProblem> {
    if first.size_bytes != second.size_bytes {
        return Err(ContentProblem {
            kind: CheckKind::NotIdempotent,
            detail: format!(
                "size {} after recovery, {} after crashing during recovery and recovering again",
                first.size_bytes, second.size_bytes
            ),
        });
    }
    let differing = first
        .contents
        .iter()
        .zip(&second.contents)
        .enumerate()
        .filter(|(_, (a, b))| a != b);
    let mut count = 0u64;
    let mut first_difference = None;
    for (sector, (a, b)) in differing {
        count += 1;
        first_difference.get_or_insert((sector, *a, *b));
    }
    match first_difference {
        None => Ok(()),
        Some((sector, a, b)) => Err(ContentProblem {
            kind: CheckKind::NotIdempotent,
            detail: format!(
                "guest sector {sector} reads {a} after recovery but {b} after crashing during recovery and recovering again ({count} sectors differ)"
            ),
        }),
    }
}
