//! Check (f): `qemu-img` judges crash images of qcow2 targets. Runs only
//! where `qemu-img` is installed.

use std::process::Command;
use std::sync::Arc;

use qj_journal::Storage;
use qj_model_checks::targets::RawTarget;
use qj_model_checks::{
    explore, qemu_img_available, qemu_img_check, CheckKind, CheckSummary, CrashTarget,
    ExploreConfig, GuestDisk, LeakExpectation, QemuExport, TargetError, WorkloadConfig,
};

/// A qcow2 image made by QEMU: 1 MiB, the first 64 KiB written.
fn qemu_image() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("1M")
        .status()
        .unwrap();
    assert!(status.success());
    let status = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 64k"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(status.status.success());
    std::fs::read(&path).unwrap()
}

fn be64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Points the first L2 entry 512 bytes past its data cluster: QEMU calls
/// that a corruption.
fn misalign_first_l2_entry(image: &mut [u8]) {
    let l1 = be64(image, 40) as usize;
    let l2 = (be64(image, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be64(image, l2);
    image[l2..l2 + 8].copy_from_slice(&(entry + 0x200).to_be_bytes());
}

#[test]
fn qemu_img_verdicts_on_clean_and_corrupt_images() {
    if !qemu_img_available() {
        eprintln!("qemu-img not installed: skipped");
        return;
    }
    let image = qemu_image();
    let clean = qemu_img_check(&image).unwrap();
    assert_eq!(
        (clean.corruptions, clean.leaks, clean.check_errors),
        (0, 0, 0)
    );
    assert!(!clean.corrupt_flag && !clean.dirty_flag);
    assert!(clean.problems(LeakExpectation::Any).is_empty());
    assert_eq!(
        clean.problems(LeakExpectation::Exactly(2)).len(),
        1,
        "leaks must match"
    );

    let mut broken = image.clone();
    misalign_first_l2_entry(&mut broken);
    let verdict = qemu_img_check(&broken).unwrap();
    assert!(verdict.corruptions > 0, "{verdict:?}");
    assert_eq!(verdict.check_exit, 2);
    assert!(!verdict.problems(LeakExpectation::Any).is_empty());

    assert!(qemu_img_check(b"not a qcow2 image").is_err());
}

/// A raw target that also exports a fixed qcow2 image for check (f).
struct Exporting {
    image: Vec<u8>,
}

impl CrashTarget for Exporting {
    fn name(&self) -> String {
        "exporting".into()
    }
    fn create(
        &self,
        dev: Arc<dyn Storage>,
        b: Option<Arc<dyn Storage>>,
        size: u64,
    ) -> Result<Box<dyn GuestDisk>, TargetError> {
        RawTarget::default().create(dev, b, size)
    }
    fn open(
        &self,
        dev: Arc<dyn Storage>,
        b: Option<Arc<dyn Storage>>,
    ) -> Result<Box<dyn GuestDisk>, TargetError> {
        RawTarget::default().open(dev, b)
    }
    fn check(&self, dev: Arc<dyn Storage>) -> Result<CheckSummary, TargetError> {
        RawTarget::default().check(dev)
    }
    fn leaks_allowed(&self) -> bool {
        false
    }
    fn qemu_export(&self, _dev: Arc<dyn Storage>) -> Result<Option<QemuExport>, TargetError> {
        Ok(Some(QemuExport {
            image: self.image.clone(),
            leaks: LeakExpectation::Exactly(0),
        }))
    }
}

#[test]
fn exploration_samples_images_for_qemu_img() {
    if !qemu_img_available() {
        eprintln!("qemu-img not installed: skipped");
        return;
    }
    let mut workload = WorkloadConfig::preset("mixed").unwrap();
    workload.size_bytes = 64 << 10;
    workload.ops_per_thread = 10;
    let mut config = ExploreConfig::new(workload);
    config.states_budget = 60;
    config.qemu_every = 20;
    config.continue_every = 0;
    config.shrink = false;
    let image = qemu_image();
    let report = explore(
        Arc::new(Exporting {
            image: image.clone(),
        }),
        &config,
        None,
    )
    .unwrap();
    assert!(report.violations.is_empty(), "{}", report.violations[0]);
    assert!(report.summary.qemu_checks > 0, "{:?}", report.summary);

    let mut broken = image;
    misalign_first_l2_entry(&mut broken);
    let report = explore(Arc::new(Exporting { image: broken }), &config, None).unwrap();
    let violation = report.violations.first().expect("qemu-img must object");
    assert_eq!(violation.kind, CheckKind::Qemu);
    assert!(violation.detail.contains("corruptions"), "{violation}");
}
