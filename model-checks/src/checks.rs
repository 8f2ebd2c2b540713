//! The content checks of a recovered disk: (b) every sector holds an
//! allowed content, (c) nothing a completed flush made durable is lost, and
//! the comparison behind (d).

use crate::content_map::{ContentMap, ContentSource};
use crate::guest_model::{GuestModel, Observed, SectorVerdict};
use crate::medium::{Medium, SECTOR_BYTES};
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

/// The first bad sector found while judging, and how many were bad.
#[derive(Default)]
struct Findings {
    first_problem: Option<ContentProblem>,
    bad_sectors: u64,
}

impl Findings {
    fn into_result(self) -> Result<(), ContentProblem> {
        match self.first_problem {
            None => Ok(()),
            Some(mut problem) => {
                if self.bad_sectors > 1 {
                    problem
                        .detail
                        .push_str(&format!(" ({} bad sectors in all)", self.bad_sectors));
                }
                Err(problem)
            }
        }
    }
}

fn size_problem(size_bytes: u64, model: &GuestModel) -> Option<ContentProblem> {
    (!model.size_allowed(size_bytes)).then(|| ContentProblem {
        kind: CheckKind::NotAllowed,
        detail: format!(
            "disk size {size_bytes} bytes, allowed sizes {:?}",
            model.allowed_sizes()
        ),
    })
}

/// Reads guest bytes `[start, end)` and judges every sector against
/// `model`, storing what each holds in `contents` (indexed by sector).
fn read_and_judge(
    disk: &dyn GuestDisk,
    model: &GuestModel,
    start: u64,
    end: u64,
    buf: &mut [u8],
    contents: &mut [Content],
    findings: &mut Findings,
) -> Result<(), ContentProblem> {
    let mut offset = start;
    // Bounded by the range, which the disk size bounds.
    while offset < end {
        let n = (end - offset).min(buf.len() as u64) as usize;
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
                findings.bad_sectors += 1;
                if findings.first_problem.is_none() {
                    findings.first_problem = Some(ContentProblem {
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
            if let Some(slot) = usize::try_from(sector)
                .ok()
                .and_then(|s| contents.get_mut(s))
            {
                *slot = match decoded {
                    Decoded::Content(content) => content,
                    // Unreachable after a problem is recorded; keep a stand-in.
                    _ => Content::Zero,
                };
            }
        }
        offset += n as u64;
    }
    Ok(())
}

/// Reads the whole disk and judges every sector against `model`. Returns
/// what the disk showed, or the first problem (with the count of bad
/// sectors).
pub fn observe(disk: &dyn GuestDisk, model: &GuestModel) -> Result<Observed, ContentProblem> {
    let size_bytes = disk.size_bytes();
    if let Some(problem) = size_problem(size_bytes, model) {
        return Err(problem);
    }
    let sectors = usize::try_from(size_bytes / SECTOR_BYTES).unwrap_or(0);
    let mut contents = vec![Content::Zero; sectors];
    let mut buf = vec![0u8; READ_CHUNK_BYTES as usize];
    let mut findings = Findings::default();
    read_and_judge(
        disk,
        model,
        0,
        size_bytes,
        &mut buf,
        &mut contents,
        &mut findings,
    )?;
    findings.into_result()?;
    Ok(Observed {
        size_bytes,
        contents,
    })
}

/// A crash state of a crash point whose whole disk was read and passed:
/// the states after it at the same point, judged against the same model,
/// need only read what may read differently.
pub struct Reference {
    observed: Observed,
    map: ContentMap,
    host: Medium,
}

/// The guest clusters whose content may differ from `reference`'s: those
/// whose source differs, is opaque, or is a host range whose bytes differ.
/// `None` when the two disks cannot be compared cluster by cluster.
fn changed_clusters(reference: &Reference, map: &ContentMap, host: &Medium) -> Option<Vec<u64>> {
    if map.cluster_bytes != reference.map.cluster_bytes
        || map.sources.len() != reference.map.sources.len()
    {
        return None;
    }
    let changed = map
        .sources
        .iter()
        .zip(&reference.map.sources)
        .enumerate()
        .filter(|&(_, (now, then))| {
            now != then
                || match *now {
                    ContentSource::Zero | ContentSource::Backing => false,
                    ContentSource::Opaque => true,
                    ContentSource::Host(offset) => {
                        !host.same_range(&reference.host, offset, map.cluster_bytes)
                    }
                }
        })
        .map(|(cluster, _)| cluster as u64)
        .collect();
    Some(changed)
}

/// Like [`observe`], but reading only the guest clusters that may read
/// differently from `reference` (a state of the same crash point, judged
/// against the same `model`): the rest read as they did there, where they
/// passed. `host` is the device the disk reads from, as it is now.
/// Without a usable reference (or a map from the disk) the whole disk is
/// read, and when it passes it becomes the reference.
pub fn observe_changed(
    disk: &dyn GuestDisk,
    model: &GuestModel,
    host: &Medium,
    reference: &mut Option<Reference>,
) -> Result<Observed, ContentProblem> {
    // A disk that cannot map its content is read whole, like one whose
    // mapping fails (the read then reports what is wrong).
    let map = disk.content_map().ok().flatten();
    let size_bytes = disk.size_bytes();
    let usable = reference
        .as_ref()
        .filter(|r| r.observed.size_bytes == size_bytes);
    let changed = match (usable, &map) {
        (Some(r), Some(map)) => changed_clusters(r, map, host).map(|c| (r, map, c)),
        _ => None,
    };
    let Some((reference, map, changed)) = changed else {
        let observed = observe(disk, model)?;
        if let Some(map) = map {
            *reference = Some(Reference {
                observed: observed.clone(),
                map,
                host: host.clone(),
            });
        }
        return Ok(observed);
    };
    if let Some(problem) = size_problem(size_bytes, model) {
        return Err(problem);
    }
    let mut contents = reference.observed.contents.clone();
    let mut buf = vec![0u8; READ_CHUNK_BYTES as usize];
    let mut findings = Findings::default();
    let mut index = 0;
    // Runs of adjacent changed clusters are read as one range.
    while index < changed.len() {
        let first = changed[index];
        let mut last = first;
        while changed.get(index + 1) == Some(&(last + 1)) {
            index += 1;
            last += 1;
        }
        index += 1;
        let start = first * map.cluster_bytes;
        let end = ((last + 1) * map.cluster_bytes).min(size_bytes);
        read_and_judge(
            disk,
            model,
            start,
            end,
            &mut buf,
            &mut contents,
            &mut findings,
        )?;
    }
    findings.into_result()?;
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::target::TargetError;

    const CLUSTER: u64 = 4096;

    /// A disk whose clusters read from a host medium as its map says, and
    /// that counts the bytes read.
    struct MappedDisk {
        host: Medium,
        map: ContentMap,
        size_bytes: u64,
        bytes_read: AtomicU64,
    }

    impl MappedDisk {
        fn new(host: Medium, sources: Vec<ContentSource>) -> Self {
            Self {
                size_bytes: sources.len() as u64 * CLUSTER,
                host,
                map: ContentMap {
                    cluster_bytes: CLUSTER,
                    sources,
                },
                bytes_read: AtomicU64::new(0),
            }
        }
    }

    impl GuestDisk for MappedDisk {
        fn size_bytes(&self) -> u64 {
            self.size_bytes
        }
        fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), TargetError> {
            self.bytes_read
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            for (i, sector) in buf.chunks_mut(SECTOR_BYTES as usize).enumerate() {
                let guest = offset + i as u64 * SECTOR_BYTES;
                let in_cluster = guest % CLUSTER;
                match self.map.sources[(guest / CLUSTER) as usize] {
                    ContentSource::Host(at) => self.host.read(sector, at + in_cluster),
                    _ => sector.fill(0),
                }
            }
            Ok(())
        }
        fn write(&self, _: &[u8], _: u64) -> Result<(), TargetError> {
            Err(TargetError::Invalid("read-only".into()))
        }
        fn write_zeroes(&self, _: u64, _: u64) -> Result<(), TargetError> {
            Err(TargetError::Invalid("read-only".into()))
        }
        fn discard(&self, _: u64, _: u64) -> Result<(), TargetError> {
            Err(TargetError::Invalid("read-only".into()))
        }
        fn flush(&self) -> Result<(), TargetError> {
            Ok(())
        }
        fn resize(&self, _: u64) -> Result<(), TargetError> {
            Err(TargetError::Invalid("read-only".into()))
        }
        fn close(self: Box<Self>) -> Result<(), TargetError> {
            Ok(())
        }
        fn content_map(&self) -> Result<Option<ContentMap>, TargetError> {
            Ok(Some(self.map.clone()))
        }
    }

    /// Four guest clusters: zeros, host cluster 1, host cluster 2, zeros.
    /// A fresh model without backing allows only zeros.
    fn setup() -> (GuestModel, Medium, Vec<ContentSource>) {
        let model = GuestModel::new(4 * CLUSTER, 0, 1).unwrap();
        let host = Medium::from_bytes(&[0u8; 4 * CLUSTER as usize]);
        let sources = vec![
            ContentSource::Zero,
            ContentSource::Host(CLUSTER),
            ContentSource::Host(2 * CLUSTER),
            ContentSource::Backing,
        ];
        (model, host, sources)
    }

    #[test]
    fn only_clusters_whose_bytes_or_source_changed_are_read_again() {
        let (model, host, sources) = setup();
        let mut reference = None;
        let first = MappedDisk::new(host.clone(), sources.clone());
        let whole = observe_changed(&first, &model, &first.host, &mut reference).unwrap();
        assert_eq!(first.bytes_read.load(Ordering::Relaxed), 4 * CLUSTER);
        assert!(reference.is_some(), "a passing full read is the reference");

        // The same image: nothing to read, the same content.
        let same = MappedDisk::new(host.clone(), sources.clone());
        let again = observe_changed(&same, &model, &same.host, &mut reference).unwrap();
        assert_eq!(same.bytes_read.load(Ordering::Relaxed), 0);
        assert_eq!(again, whole);

        // Garbage in host cluster 2: exactly that guest cluster is read,
        // and the bad sector is reported.
        let mut bad_host = host.clone();
        bad_host.write(&[0x5a; 512], 2 * CLUSTER + 512).unwrap();
        let bad = MappedDisk::new(bad_host, sources.clone());
        let problem = observe_changed(&bad, &model, &bad.host, &mut reference).unwrap_err();
        assert_eq!(bad.bytes_read.load(Ordering::Relaxed), CLUSTER);
        assert!(
            problem.detail.starts_with("guest sector 17 "),
            "{}",
            problem.detail
        );

        // Unchanged host bytes but a cluster remapped onto garbage: read.
        let mut moved_host = host.clone();
        moved_host.write(&[0x5a; 512], 3 * CLUSTER).unwrap();
        let mut moved_sources = sources.clone();
        moved_sources[0] = ContentSource::Host(3 * CLUSTER);
        let moved = MappedDisk::new(moved_host, moved_sources);
        let problem = observe_changed(&moved, &model, &moved.host, &mut reference).unwrap_err();
        assert_eq!(moved.bytes_read.load(Ordering::Relaxed), CLUSTER);
        assert!(
            problem.detail.starts_with("guest sector 0 "),
            "{}",
            problem.detail
        );
    }

    #[test]
    fn opaque_clusters_and_other_sizes_are_always_read() {
        let (model, host, mut sources) = setup();
        sources[1] = ContentSource::Opaque;
        let mut reference = None;
        let first = MappedDisk::new(host.clone(), sources.clone());
        observe_changed(&first, &model, &first.host, &mut reference).unwrap();
        let second = MappedDisk::new(host.clone(), sources.clone());
        observe_changed(&second, &model, &second.host, &mut reference).unwrap();
        assert_eq!(second.bytes_read.load(Ordering::Relaxed), CLUSTER);
        // A disk of another size is read whole (and judged by the model's
        // sizes: this one is not allowed).
        sources.push(ContentSource::Zero);
        let bigger = MappedDisk::new(host, sources);
        let problem = observe_changed(&bigger, &model, &bigger.host, &mut reference).unwrap_err();
        assert!(
            problem.detail.starts_with("disk size"),
            "{}",
            problem.detail
        );
    }
}
