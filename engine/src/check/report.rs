//! The result of a check: counters in qemu-img's meaning and one message
//! per problem in qemu-img's wording.

use serde::Serialize;

/// Most messages a report keeps; a badly damaged image can produce one per
/// cluster, and the counters stay exact regardless.
pub const MESSAGES_MAX: usize = 10_000;

/// What `check` found (and, with a repair mode, what it fixed). The counts
/// mean what `qemu-img check --output=json` means by them: after a repair
/// that fixed something, `corruptions` and `leaks` are those of a second,
/// read-only pass over the repaired image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// Metadata inconsistencies that can lose data.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// Problems that stopped part of the check (I/O errors, unreadable
    /// refcount blocks, a repair that needed `All` under `Leaks`).
    pub check_errors: u64,
    /// Corruptions the repair fixed.
    pub corruptions_fixed: u64,
    /// Leaks the repair fixed.
    pub leaks_fixed: u64,
    /// Guest clusters mapped by the active L1 table.
    pub allocated_clusters: u64,
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// Mapped guest clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// One past the last byte of the last cluster in use.
    pub image_end_offset: u64,
    /// One line per problem, shaped like qemu-img's stderr lines.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// qemu-img check's exit status for this result: 1 when the check could
    /// not complete, 2 corruptions, 3 only leaks, 0 clean.
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// Whether the image is consistent (nothing left to fix).
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }
}

/// The counters of one pass, mirroring QEMU's BdrvCheckResult so that the
/// checker can save and restore them the way qcow2_check_refcounts does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
}

impl Tally {
    /// Moves one counted corruption to the fixed column.
    pub fn corruption_fixed(&mut self) {
        debug_assert!(
            self.corruptions > 0,
            "fixing a corruption that was not counted"
        );
        self.corruptions = self.corruptions.saturating_sub(1);
        self.corruptions_fixed += 1;
    }

    /// Adds the problem counters of `other` (not the allocation info).
    pub fn add_problems(&mut self, other: &Tally) {
        self.corruptions += other.corruptions;
        self.leaks += other.leaks;
        self.check_errors += other.check_errors;
        self.corruptions_fixed += other.corruptions_fixed;
        self.leaks_fixed += other.leaks_fixed;
    }
}

/// The message lines, bounded by [`MESSAGES_MAX`].
#[derive(Debug, Default)]
pub(crate) struct Log {
    lines: Vec<String>,
    suppressed: u64,
}

impl Log {
    pub fn push(&mut self, line: String) {
        if self.lines.len() < MESSAGES_MAX {
            self.lines.push(line);
        } else {
            self.suppressed += 1;
        }
    }

    pub fn into_lines(mut self) -> Vec<String> {
        if self.suppressed > 0 {
            self.lines
                .push(format!("... {} more messages suppressed", self.suppressed));
        }
        self.lines
    }
}
