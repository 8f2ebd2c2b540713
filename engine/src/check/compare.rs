//! Comparing counted references with the stored refcounts (QEMU's
//! compare_refcounts), fixing the difference when the mode allows.

use super::checker::Checker;
use super::error::CheckError;
use super::image::DiskRefcounts;
use super::imrt::Imrt;
use super::report::Tally;
use super::RepairMode;

impl Checker<'_> {
    /// Walks every cluster: stored refcount above the references is a leak,
    /// below is a corruption; a stored 0 under a reference needs a rebuild
    /// (sets `*rebuild`). With `fix`, leaks (and with `All` corruptions)
    /// are corrected in place. Returns the highest cluster in use.
    pub fn compare_refcounts(
        &mut self,
        imrt: &Imrt,
        tally: &mut Tally,
        fix: RepairMode,
        rebuild: &mut bool,
    ) -> Result<u64, CheckError> {
        let mut disk = DiskRefcounts::new(&self.image);
        let mut highest = 0u64;
        let mut wrote = false;
        for i in 0..imrt.clusters() {
            let stored = match disk.get(self.storage, i) {
                Ok(r) => r,
                Err(e) => {
                    self.msg(format!("Can't get refcount for cluster {i}: {e}"));
                    tally.check_errors += 1;
                    continue;
                }
            };
            let counted = imrt.get(i);
            if stored > 0 || counted > 0 {
                highest = i;
            }
            if stored == counted {
                continue;
            }
            enum Fix {
                Leak,
                Corruption,
            }
            let fixing = if stored == 0 {
                // No refcount block entry to correct in place: only a
                // rebuild can help.
                *rebuild = true;
                None
            } else if stored > counted && fix.fixes_leaks() {
                Some(Fix::Leak)
            } else if stored < counted && fix.fixes_errors() {
                Some(Fix::Corruption)
            } else {
                None
            };
            let verb = match (&fixing, stored < counted) {
                (Some(_), _) => "Repairing",
                (None, true) => "ERROR",
                (None, false) => "Leaked",
            };
            self.msg(format!(
                "{verb} cluster {i} refcount={stored} reference={counted}"
            ));
            if let Some(kind) = fixing {
                match disk.set(self.storage, i, counted) {
                    Ok(()) => {
                        wrote = true;
                        match kind {
                            Fix::Leak => tally.leaks_fixed += 1,
                            Fix::Corruption => tally.corruptions_fixed += 1,
                        }
                        continue;
                    }
                    Err(e) => self.msg(format!(
                        "ERROR could not update refcount of cluster {i}: {e}"
                    )),
                }
            }
            if stored < counted {
                tally.corruptions += 1;
            } else {
                tally.leaks += 1;
            }
        }
        if wrote {
            disk.write_back(self.storage)
                .map_err(CheckError::io("writing a refcount block"))?;
            // Ordering: corrected refcounts are durable before the COPIED
            // flags are derived from them (a COPIED flag set over a refcount
            // that a crash rolls back to 2 would let a write clobber a
            // snapshot's data).
            self.flush("refcount repairs")?;
        }
        Ok(highest)
    }
}
