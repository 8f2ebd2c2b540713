//! Turning the journal on and off, and re-creating it after a program
//! that does not know it wrote the image.

use std::sync::Arc;

use qj_journal::{CommitProtocol, Storage};
use qj_spec::qcow2::dedup_index::DedupIndexExtension;
use qj_spec::qcow2::{features, Header, HeaderExtension, JournalExtension};
use qj_spec::units::{HostCluster, HostOffset};

use super::Image;
use crate::backend::journal::JournalBackend;
use crate::backend::ordered::FlushOrdering;
use crate::error::{Error, IoContext, Result};
use crate::metadata_map::MetadataKind;
use crate::options::{BackingSource, JournalConfig, OpenOptions};

impl Image {
    /// Gives an image without a journal a fresh one: clusters allocated and
    /// counted, the region formatted, then one header write that links it.
    /// Each step is durable before the next, so a crash in between leaves
    /// at worst leaked clusters.
    pub fn enable_journal(storage: Arc<dyn Storage>, config: &JournalConfig) -> Result<()> {
        let image = Self::open_for_metadata_change(storage.clone())?;
        if image.header.lock().mem.journal().is_some() {
            return Err(Error::InvalidArgument(
                "the image already has a journal".into(),
            ));
        }
        let g = image.geometry;
        let cs = g.cluster_size();
        let size = crate::create::journal_bytes(config, cs)?;
        // Metadata is written back in 512-byte sectors: journal blocks of
        // the same size carry them without padding (4 KiB blocks made each
        // synced allocating write log 16 KiB instead of 2 KiB).
        let block_size = 512u32;

        let start = image.refcounts.lock().allocate_contiguous(
            &*image.storage,
            &*image.backend,
            &image.counters,
            size / cs,
        )?;
        image
            .metadata
            .write()
            .insert(start, size / cs, MetadataKind::Journal)
            .map_err(|o| Error::Corrupt(format!("new journal overlaps the {}", o.existing)))?;
        let offset = g.host_offset(start);
        let clusters = size / cs;
        // Ordering: the region is written and durable before its counts
        // are. Until the counts are durable its clusters are free on disk,
        // so a crash, or a disk that fills up while the region is
        // zero-filled, leaves nothing counted and nothing referenced: no
        // leak (writing into clusters that are free on disk is harmless;
        // nothing reads them). The region lies inside the file, so that
        // every cluster the image counts exists (QEMU's check treats
        // counted clusters past the end of the file as errors, and so does
        // ours).
        let old_len = storage.len().ctx(|| "reading the image length".into())?;
        let protocol = if config.two_flush {
            CommitProtocol::TwoFlush
        } else {
            CommitProtocol::SingleFlush
        };
        let region = (|| {
            let end = offset.0 + size;
            if old_len < end {
                storage
                    .set_len(end)
                    .ctx(|| "extending the image over the journal".into())?;
            }
            JournalBackend::format(storage.clone(), offset, size, block_size, protocol)?;
            storage.flush().ctx(|| "flushing the new journal".into())
        })();
        if let Err(e) = region {
            // Nothing counts or references the region: drop the in-memory
            // allocation and give the file its length back.
            image.abandon();
            if storage.len().is_ok_and(|len| len > old_len) {
                let _ = storage.set_len(old_len);
                let _ = storage.flush();
            }
            return Err(e);
        }
        // Counted, perhaps durably, but not linked: free exactly the
        // region's clusters again, or say which ones stay leaked.
        let unwind = |e: Error| {
            match Self::free_unlinked(storage.clone(), start, clusters) {
            Ok(()) => e,
            Err(again) => Error::Journal(format!(
                "{e}; freeing the journal's clusters {}..{} failed too ({again}): they are leaked until `qj check -r leaks`",
                start.0,
                start.0 + clusters
            )),
        }
        };
        // The journal's counts are durable before the header links it.
        if let Err(e) = image.persist_all() {
            image.abandon();
            return Err(unwind(e));
        }
        {
            let mut h = image.header.lock();
            if config.dedup {
                h.mem.set_dedup_index(Some(DedupIndexExtension::EMPTY));
            }
            h.mem.set_journal(Some(JournalExtension {
                offset: offset.0,
                size,
                flags: if config.two_flush {
                    JournalExtension::FLAG_TWO_FLUSH_COMMIT
                } else {
                    0
                } | if config.log_data {
                    JournalExtension::FLAG_LOG_DATA
                } else {
                    0
                } | if config.dedup {
                    JournalExtension::FLAG_DEDUP
                } else {
                    0
                },
            }));
            h.mem.autoclear_features |= features::AUTOCLEAR_JOURNAL_VALID_MASK;
            name_journal_features(&mut h.mem);
            h.dirty = true;
        }
        image.close().map_err(unwind)
    }

    /// Frees the clusters `[start, start + clusters)` of a journal region
    /// that no header links: each still counted drops to zero.
    fn free_unlinked(storage: Arc<dyn Storage>, start: HostCluster, clusters: u64) -> Result<()> {
        let image = Self::open_for_metadata_change(storage)?;
        if image
            .header
            .lock()
            .mem
            .journal()
            .is_some_and(|j| image.geometry.host_cluster(HostOffset(j.offset)) == start)
        {
            // The header did link it after all: it is the image's journal.
            return image.close();
        }
        {
            let mut rc = image.refcounts.lock();
            for c in start.0..start.0 + clusters {
                let cluster = HostCluster(c);
                if rc.get(&*image.storage, &*image.backend, cluster)? > 0 {
                    rc.free(&*image.storage, &*image.backend, cluster)?;
                }
            }
        }
        image.close()
    }

    /// Opens read-write on flush ordering without the backing file, to
    /// change the image's own structure (journal on, off, re-created).
    fn open_for_metadata_change(storage: Arc<dyn Storage>) -> Result<Image> {
        let opts = OpenOptions {
            backing: BackingSource::Ignore,
            ..OpenOptions::read_write()
        };
        Self::open_with_backend(storage, &opts, Box::new(FlushOrdering::new()))
    }

    /// Removes the journal: replays and checkpoints it, unlinks it from
    /// the header, then frees its clusters (after the unlinking is durable,
    /// by the usual free rules).
    pub fn disable_journal(storage: Arc<dyn Storage>) -> Result<()> {
        let opts = OpenOptions {
            backing: BackingSource::Ignore,
            ..OpenOptions::read_write()
        };
        Self::open(storage.clone(), &opts)?.close()?;
        let image = Self::open_for_metadata_change(storage)?;
        let Some(ext) = image.header.lock().mem.journal() else {
            return image.close();
        };
        {
            let mut h = image.header.lock();
            h.mem.set_journal(None);
            h.mem.autoclear_features &= !features::AUTOCLEAR_JOURNAL_VALID_MASK;
            h.dirty = true;
        }
        // The index is kept in step by the journal only.
        image.dedup_drop_persisted()?;
        {
            let g = image.geometry;
            image
                .metadata
                .write()
                .remove(g.host_cluster(HostOffset(ext.offset)));
            let mut rc = image.refcounts.lock();
            for i in 0..ext.size / g.cluster_size() {
                let cluster = HostCluster(g.host_cluster(HostOffset(ext.offset)).0 + i);
                rc.free(&*image.storage, &*image.backend, cluster)?;
            }
        }
        image.close()
    }

    /// Turns deduplication on or off (journal extension flag bit 2). Only a
    /// journalled image can have it: there is no flush order that keeps an
    /// index and the L2 tables together without one (spec §3.6). The
    /// journal is first replayed and checkpointed by a normal open and
    /// close, so that no dedup descriptor is left for an opener without
    /// the index to refuse. Asking for the setting the image has changes
    /// nothing.
    pub fn set_dedup(storage: Arc<dyn Storage>, on: bool) -> Result<()> {
        let header = Self::read_header(&*storage)?;
        let Some(ext) = header.journal() else {
            return Err(Error::InvalidArgument(
                "dedup needs a journal: this image has none (give it one with journal=on first)"
                    .into(),
            ));
        };
        if (ext.flags & JournalExtension::FLAG_DEDUP != 0) == on {
            return Ok(());
        }
        let opts = OpenOptions {
            backing: BackingSource::Ignore,
            ..OpenOptions::read_write()
        };
        Self::open(storage.clone(), &opts)?.close()?;
        let image = Self::open_for_metadata_change(storage)?;
        if !on {
            image.dedup_drop_persisted()?;
        }
        {
            let mut h = image.header.lock();
            let Some(mut ext) = h.mem.journal() else {
                return Err(Error::Journal(
                    "the journal disappeared while dedup was being changed".into(),
                ));
            };
            if on {
                ext.flags |= JournalExtension::FLAG_DEDUP;
                h.mem.set_dedup_index(Some(DedupIndexExtension::EMPTY));
            } else {
                ext.flags &= !JournalExtension::FLAG_DEDUP;
            }
            h.mem.set_journal(Some(ext));
            // This open (flush ordering) cleared "journal valid" as any
            // writer that does not keep the journal must; the journal was
            // left clean just before and nothing but the header changes.
            h.mem.autoclear_features |= features::AUTOCLEAR_JOURNAL_VALID_MASK;
            h.dirty = true;
        }
        image.close()
    }

    /// After a program that does not know the journal wrote the image: drop
    /// the stale journal, free exactly its clusters that are now leaked
    /// (those the other program did not reuse), and create a fresh one.
    pub(super) fn recreate_journal(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        old: JournalExtension,
    ) -> Result<Image> {
        // The new journal's clusters come from the refcounts: refcounts
        // that are too low would hand out clusters in use (the overlap
        // guard stops the ones it knows; a data cluster it cannot). Decided
        // before anything is written, so that the refusal changes nothing;
        // the stale journal's own clusters are only leaks (found by the
        // whole-image fuzz target).
        let report =
            crate::check::check(&*storage, crate::check::RepairMode::None, &[]).map_err(|e| {
                Error::Journal(format!(
                    "checking the image before re-creating its journal: {e}"
                ))
            })?;
        if report.corruptions > 0 || report.check_errors > 0 {
            return Err(Error::Corrupt(format!(
                "{} corruption(s) and {} check error(s) found before re-creating the journal",
                report.corruptions, report.check_errors
            )));
        }
        let image = Self::open_for_metadata_change(storage.clone())?;
        {
            let mut h = image.header.lock();
            h.mem.set_journal(None);
            // The persisted dedup index is stale too (the other program may
            // have freed or rewritten indexed clusters): dropped, and its
            // clusters, no longer counted by check while "journal valid" is
            // clear, are freed as leaks below with the journal's.
            h.mem.set_dedup_index(None);
            h.dirty = true;
        }
        image.close()?;
        crate::check::check(&*storage, crate::check::RepairMode::Leaks, &[])
            .map_err(|e| Error::Journal(format!("freeing the stale journal's clusters: {e}")))?;
        let config = JournalConfig {
            size_bytes: old.size,
            two_flush: old.flags & JournalExtension::FLAG_TWO_FLUSH_COMMIT != 0,
            log_data: old.flags & JournalExtension::FLAG_LOG_DATA != 0,
            dedup: old.flags & JournalExtension::FLAG_DEDUP != 0,
        };
        Self::enable_journal(storage.clone(), &config)?;
        Self::open(storage, opts)
    }
}

/// Puts the names of our feature bits into the header's feature name table,
/// so that a program refusing the image names them ("journal dirty"). QEMU
/// writes its own table whenever it rewrites the header and drops names it
/// does not know (`shared/notes/qemu-behaviour.md`), so a journal re-created
/// after QEMU wrote the image needs them back. Entries already there are
/// kept. Like at creation, the table is left out when it does not fit in
/// the header cluster: it is informational only.
fn name_journal_features(header: &mut Header) {
    let ours = qj_spec::qcow2::features::qjournal_feature_names();
    let at = header
        .extensions
        .iter()
        .position(|e| matches!(e, HeaderExtension::FeatureNameTable(_)));
    match at {
        Some(i) => {
            if let HeaderExtension::FeatureNameTable(names) = &mut header.extensions[i] {
                for name in ours {
                    if !names
                        .iter()
                        .any(|n| n.kind == name.kind && n.bit == name.bit)
                    {
                        names.push(name);
                    }
                }
            }
        }
        None => header
            .extensions
            .push(HeaderExtension::FeatureNameTable(ours)),
    }
    if header.encode().is_err() {
        header
            .extensions
            .retain(|e| !matches!(e, HeaderExtension::FeatureNameTable(_)));
    }
}
