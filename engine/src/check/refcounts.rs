//! The refcount part of a check (QEMU's qcow2_check_refcounts): count,
//! compare, repair or rebuild, then the COPIED flags.

use super::checker::Checker;
use super::error::CheckError;
use super::imrt::Imrt;
use super::report::Tally;
use super::RepairMode;

/// Allocation information of the pass, for the report.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RefcountSummary {
    pub highest_cluster: u64,
}

impl Checker<'_> {
    fn fresh_imrt(&self) -> Result<Imrt, CheckError> {
        let clusters = self.image.geometry.clusters_for(self.file_len);
        Imrt::new(self.image.geometry, clusters).ok_or(CheckError::TooLarge { clusters })
    }

    /// Runs the refcount check into `tally`. Returns `None` where QEMU's
    /// check fails outright (check_errors is then non-zero).
    pub fn check_refcounts(
        &mut self,
        tally: &mut Tally,
    ) -> Result<Option<RefcountSummary>, CheckError> {
        let mode = self.mode;
        let mut imrt = self.fresh_imrt()?;
        let mut rebuild = false;
        if !self.calculate_refcounts(&mut imrt, tally, mode.fixes_errors(), &mut rebuild)? {
            return Ok(None);
        }

        // Count first without fixing; if a fix is wanted and possible
        // without a rebuild, the comparison runs again from this point.
        let before_compare = *tally;
        let mut highest = self.compare_refcounts(&imrt, tally, RepairMode::None, &mut rebuild)?;

        if rebuild && mode.fixes_errors() {
            let before_rebuild = *tally;
            self.msg("Rebuilding refcount structure".into());
            self.rebuild_refcount_structure(&mut imrt)?;
            tally.corruptions = 0;
            tally.leaks = 0;
            // The references must be counted again: the old structure is now
            // unreferenced and the new one is.
            rebuild = false;
            imrt = self.fresh_imrt()?;
            if !self.calculate_refcounts(&mut imrt, tally, false, &mut rebuild)? {
                return Ok(None);
            }

            // The old structure is leaked now: free it. Leaks this pass
            // cannot fix were introduced by the rebuild itself.
            let saved = *tally;
            *tally = Tally::default();
            highest = self.compare_refcounts(&imrt, tally, RepairMode::Leaks, &mut rebuild)?;
            if rebuild {
                self.msg("ERROR rebuilt refcount structure is still broken".into());
            }
            let fresh_leaks = tally.leaks;
            *tally = saved;

            if tally.corruptions < before_rebuild.corruptions {
                tally.corruptions_fixed += before_rebuild.corruptions - tally.corruptions;
            }
            if tally.leaks < before_rebuild.leaks {
                tally.leaks_fixed += before_rebuild.leaks - tally.leaks;
            }
            tally.leaks += fresh_leaks;
        } else if mode != RepairMode::None {
            if rebuild {
                self.msg("ERROR need to rebuild refcount structures".into());
                tally.check_errors += 1;
                return Ok(None);
            }
            if tally.leaks > 0 || tally.corruptions > 0 {
                *tally = before_compare;
                highest = self.compare_refcounts(&imrt, tally, mode, &mut rebuild)?;
            }
        }

        self.check_oflag_copied(tally)?;
        Ok(Some(RefcountSummary {
            highest_cluster: highest,
        }))
    }
}
