//! Guest reads: from this image, a compressed cluster, the backing file,
//! or zeros.

use qj_spec::qcow2::L2Entry;
use qj_spec::units::{GuestCluster, HostOffset};

use super::Image;
use crate::compressed::inflate_cluster;
use crate::error::{IoContext, Result};
use crate::sync::Ordering;

impl Image {
    /// Reads guest bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.counters.guest_ops.fetch_add(1, Ordering::Relaxed);
        for (cluster, in_cluster, n, at) in self.pieces(offset, buf.len() as u64) {
            self.read_piece(cluster, in_cluster, &mut buf[at..at + n])?;
        }
        self.maybe_evict()
    }

    fn read_piece(&self, cluster: GuestCluster, in_cluster: usize, out: &mut [u8]) -> Result<()> {
        let guest = self.geometry.guest_offset(cluster).0 + in_cluster as u64;
        let Some(l2) = self.l1_entry(cluster)?.l2_offset() else {
            return self.read_unallocated(out, guest);
        };
        let table = self.load_l2(l2)?;
        // The table lock is held across the data read so that a concurrent
        // discard cannot free (and a writer reuse) the cluster under us.
        let t = table.data.read();
        match self.l2_entry(&t.bytes, cluster)? {
            L2Entry::Unallocated => {
                drop(t);
                self.read_unallocated(out, guest)
            }
            L2Entry::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            L2Entry::Normal { offset, .. } => {
                let host = HostOffset(offset.0 + in_cluster as u64);
                self.backend.read_data(&*self.storage, out, host)
            }
            L2Entry::Compressed {
                host_offset,
                compressed_size_max,
            } => {
                let plain = self.read_compressed(host_offset, compressed_size_max)?;
                out.copy_from_slice(&plain[in_cluster..in_cluster + out.len()]);
                Ok(())
            }
        }
    }

    fn read_compressed(&self, host_offset: u64, size: u64) -> Result<Vec<u8>> {
        // Bounded by the format: at most two clusters of compressed bytes.
        let size = size.min(2 * self.geometry.cluster_size());
        let mut compressed = vec![0u8; size as usize];
        self.storage
            .read_at(&mut compressed, host_offset)
            .ctx(|| format!("reading compressed cluster at {host_offset:#x}"))?;
        inflate_cluster(
            &compressed,
            self.geometry.cluster_size() as usize,
            host_offset,
        )
    }

    fn read_unallocated(&self, out: &mut [u8], guest: u64) -> Result<()> {
        match &self.backing {
            Some(b) => b.read(out, guest),
            None => {
                out.fill(0);
                Ok(())
            }
        }
    }

    /// The guest-visible content of `cluster` under entry `old`.
    pub(super) fn old_content(
        &self,
        cluster: GuestCluster,
        old: L2Entry,
        out: &mut [u8],
    ) -> Result<()> {
        match old {
            L2Entry::Unallocated => {
                self.read_unallocated(out, self.geometry.guest_offset(cluster).0)
            }
            L2Entry::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            // Through the backend: a deduplicated or logged cluster's
            // newest bytes may still be in the journal (logged data).
            L2Entry::Normal { offset, .. } => self.backend.read_data(&*self.storage, out, offset),
            L2Entry::Compressed {
                host_offset,
                compressed_size_max,
            } => {
                out.copy_from_slice(&self.read_compressed(host_offset, compressed_size_max)?);
                Ok(())
            }
        }
    }
}
