//! Space accounting of the ring: which blocks hold transactions that are
//! not yet synced (and so must never be overwritten), and where the next
//! transaction goes.
//!
//! Live extents are kept in log order and are contiguous modulo the ring:
//! each starts where the previous one ended, so they cover exactly
//! `[tail, head)` cyclically. An extent includes the padding that sends its
//! transaction back to block 0, so freeing it frees the padding too.

use std::collections::VecDeque;

/// One allocated stretch of the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Extent<P> {
    /// The transaction's sequence number.
    pub seq: u64,
    /// First block, padding included.
    pub start: u32,
    /// Padding blocks before the transaction (0, or up to the ring's end).
    pub pad_blocks: u32,
    /// Blocks of the transaction itself.
    pub tx_blocks: u32,
    /// Whether its commit is durable (else it is being written).
    pub committed: bool,
    /// What the journal keeps about the transaction.
    pub payload: P,
}

impl<P> Extent<P> {
    /// Blocks taken, padding included.
    pub fn blocks(&self) -> u32 {
        self.pad_blocks + self.tx_blocks
    }
}

/// Where an allocation landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    /// Ring index of the padding block, if the transaction wraps to 0.
    pub pad_at: Option<u32>,
    /// Ring index of the transaction's first block.
    pub tx_start: u32,
}

/// The ring's live extents and head.
#[derive(Debug)]
pub(crate) struct Ring<P> {
    ring_blocks: u32,
    head: u32,
    extents: VecDeque<Extent<P>>,
}

impl<P> Ring<P> {
    /// An empty ring whose next transaction goes to `head`.
    pub fn new(ring_blocks: u32, head: u32) -> Self {
        assert!(ring_blocks >= 2, "ring of {ring_blocks} blocks");
        assert!(
            head < ring_blocks,
            "head {head} outside ring of {ring_blocks}"
        );
        Self {
            ring_blocks,
            head,
            extents: VecDeque::new(),
        }
    }

    /// Blocks in the ring.
    pub fn ring_blocks(&self) -> u32 {
        self.ring_blocks
    }

    /// Where the next transaction goes (if it fits before the end).
    pub fn head(&self) -> u32 {
        self.head
    }

    /// Where the log starts: the first live extent, or the head.
    pub fn tail(&self) -> u32 {
        self.extents.front().map_or(self.head, |e| e.start)
    }

    /// Blocks held by live extents.
    pub fn used_blocks(&self) -> u64 {
        self.extents.iter().map(|e| u64::from(e.blocks())).sum()
    }

    /// Live extents in log order.
    pub fn extents(&self) -> impl Iterator<Item = &Extent<P>> {
        self.extents.iter()
    }

    /// Whether nothing is live.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Takes `tx_blocks` blocks for transaction `seq`, at the head or, with
    /// padding, at block 0; `None` if the free space cannot hold it without
    /// touching a live extent.
    pub fn allocate(&mut self, seq: u64, tx_blocks: u32, payload: P) -> Result<Placement, P> {
        let ring = self.ring_blocks;
        let head = self.head;
        let tail = self.tail();
        let to_end = ring - head;
        let placement = if self.extents.is_empty() || head > tail {
            // Free space is [head, ring) and [0, tail) (all of the ring
            // when empty, where tail == head).
            if tx_blocks <= to_end {
                Some((0, head))
            } else if tx_blocks <= tail {
                Some((to_end, 0))
            } else {
                None
            }
        } else if head < tail && tx_blocks <= tail - head {
            Some((0, head))
        } else {
            // head == tail with live extents: the ring is full.
            None
        };
        let Some((pad_blocks, tx_start)) = placement else {
            return Err(payload);
        };
        if let Some(last) = self.extents.back() {
            assert!(seq > last.seq, "sequence {seq} after {}", last.seq);
        }
        self.extents.push_back(Extent {
            seq,
            start: head,
            pad_blocks,
            tx_blocks,
            committed: false,
            payload,
        });
        self.head = (tx_start + tx_blocks) % ring;
        assert!(self.used_blocks() <= u64::from(ring), "ring over-allocated");
        Ok(Placement {
            pad_at: (pad_blocks > 0).then_some(head),
            tx_start,
        })
    }

    /// Moves an empty ring's head to block 0 (the caller has made a header
    /// saying so durable first).
    pub fn rewind(&mut self) {
        assert!(self.extents.is_empty(), "rewind with live extents");
        self.head = 0;
    }

    /// Marks every extent up to `seq` committed.
    pub fn mark_committed_through(&mut self, seq: u64) {
        for extent in self.extents.iter_mut().take_while(|e| e.seq <= seq) {
            extent.committed = true;
        }
    }

    /// Drops uncommitted extents from the back (a batch whose write
    /// failed), returning the head to where the first of them started.
    pub fn forget_uncommitted(&mut self) {
        while let Some(last) = self.extents.back() {
            if last.committed {
                break;
            }
            self.head = last.start;
            self.extents.pop_back();
        }
    }

    /// Frees extents up to and including `seq`, which must be committed.
    pub fn release_through(&mut self, seq: u64) {
        while let Some(first) = self.extents.front() {
            if first.seq > seq {
                break;
            }
            assert!(
                first.committed,
                "releasing uncommitted transaction {}",
                first.seq
            );
            self.extents.pop_front();
        }
    }

    /// Ring index of the first extent after `seq` (where the log starts once
    /// everything up to `seq` is synced).
    pub fn tail_after(&self, seq: u64) -> u32 {
        self.extents
            .iter()
            .find(|e| e.seq > seq)
            .map_or(self.head, |e| e.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_wraps_with_padding_and_frees() {
        let mut ring: Ring<()> = Ring::new(10, 0);
        assert_eq!(
            ring.allocate(1, 4, ()),
            Ok(Placement {
                pad_at: None,
                tx_start: 0
            })
        );
        assert_eq!(
            ring.allocate(2, 4, ()),
            Ok(Placement {
                pad_at: None,
                tx_start: 4
            })
        );
        assert_eq!(
            ring.allocate(3, 3, ()),
            Err(()),
            "only 2 blocks left before the end, 0 at the start"
        );
        ring.mark_committed_through(2);
        ring.release_through(1);
        assert_eq!(ring.tail(), 4);
        // 2 blocks at the end, 4 at the start: padding then block 0.
        assert_eq!(
            ring.allocate(3, 3, ()),
            Ok(Placement {
                pad_at: Some(8),
                tx_start: 0
            })
        );
        assert_eq!(ring.used_blocks(), 4 + 2 + 3);
        assert_eq!(ring.head(), 3);
        assert_eq!(
            ring.allocate(4, 2, ()),
            Err(()),
            "one block between head 3 and tail 4"
        );
        assert_eq!(
            ring.allocate(4, 1, ()),
            Ok(Placement {
                pad_at: None,
                tx_start: 3
            })
        );
        assert_eq!(ring.used_blocks(), 10);
        assert_eq!(ring.allocate(5, 1, ()), Err(()), "full");
        ring.mark_committed_through(4);
        assert_eq!(
            ring.tail_after(2),
            8,
            "after 2 the log starts at 3's padding"
        );
        ring.release_through(4);
        assert!(ring.is_empty());
        assert_eq!(ring.tail(), 4);
    }

    #[test]
    fn empty_ring_cannot_place_what_neither_side_holds_until_rewound() {
        let mut ring: Ring<()> = Ring::new(10, 5);
        assert_eq!(ring.allocate(1, 6, ()), Err(()));
        ring.rewind();
        assert_eq!(
            ring.allocate(1, 10, ()),
            Ok(Placement {
                pad_at: None,
                tx_start: 0
            })
        );
        assert_eq!(ring.head(), 0);
        assert_eq!(ring.used_blocks(), 10);
    }

    #[test]
    fn forgetting_a_failed_batch_restores_the_head() {
        let mut ring: Ring<()> = Ring::new(10, 0);
        ring.allocate(1, 3, ()).unwrap();
        ring.mark_committed_through(1);
        ring.allocate(2, 3, ()).unwrap();
        ring.allocate(3, 3, ()).unwrap();
        ring.forget_uncommitted();
        assert_eq!(ring.head(), 3);
        assert_eq!(ring.used_blocks(), 3);
    }
}
