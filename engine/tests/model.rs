//! Random operation sequences against an in-memory model of the guest disk:
//! every read must match the model, across flushes, reopen and growth.

use std::sync::Arc;

use proptest::prelude::*;
use qj_engine::{
    BackingFormat, BackingSource, CreateOptions, Image, MemStorage, OpenOptions, Storage,
};

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u64, seed: u8 },
    Zero { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
    Read { offset: u64, len: u64 },
    Flush,
    Reopen,
    Grow { by: u64 },
}

fn op_strategy(size: u64) -> impl Strategy<Value = Op> {
    let range = (0..size, 1..(size / 4)).prop_map(move |(o, l)| (o, l.min(size - o)));
    prop_oneof![
        6 => (range.clone(), any::<u8>()).prop_map(|((offset, len), seed)| Op::Write { offset, len, seed }),
        1 => range.clone().prop_map(|(offset, len)| Op::Zero { offset, len }),
        1 => range.clone().prop_map(|(offset, len)| Op::Discard { offset, len }),
        3 => range.prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => (1u64..64).prop_map(|k| Op::Grow { by: k * 4096 }),
    ]
}

fn pattern(seed: u8, offset: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ ((offset + i) as u8).wrapping_mul(31))
        .collect()
}

struct Harness {
    storage: Arc<MemStorage>,
    backing: Option<Arc<MemStorage>>,
    image: Option<Image>,
    model: Vec<u8>,
}

impl Harness {
    fn opts(&self) -> OpenOptions {
        let mut o = OpenOptions::read_write();
        o.cache_bytes_max = 0; // the smallest cache: exercises eviction and write-back
        if let Some(b) = &self.backing {
            o.backing = BackingSource::Given(b.clone(), BackingFormat::Raw);
        }
        o
    }

    fn image(&self) -> &Image {
        self.image.as_ref().unwrap()
    }

    fn apply(&mut self, op: &Op) {
        let size = self.model.len() as u64;
        let clip = |offset: u64, len: u64| (offset.min(size), len.min(size - offset.min(size)));
        match *op {
            Op::Write { offset, len, seed } => {
                let (offset, len) = clip(offset, len);
                let data = pattern(seed, offset, len);
                self.image().write(&data, offset).unwrap();
                self.model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
            Op::Zero { offset, len } => {
                let (offset, len) = clip(offset, len);
                self.image().write_zeroes(offset, len).unwrap();
                self.model[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Discard { offset, len } => {
                let (offset, len) = clip(offset, len);
                // Discard is advisory: read back what the image says for the
                // range and require each byte to be old data or zero.
                let before = self.model[offset as usize..(offset + len) as usize].to_vec();
                self.image().discard(offset, len).unwrap();
                let mut after = vec![0u8; len as usize];
                self.image().read(&mut after, offset).unwrap();
                for (i, (&b, &a)) in before.iter().zip(&after).enumerate() {
                    assert!(
                        a == b || a == 0,
                        "discard at {offset}+{i}: {a} is neither old {b} nor zero"
                    );
                }
                self.model[offset as usize..(offset + len) as usize].copy_from_slice(&after);
            }
            Op::Read { offset, len } => {
                let (offset, len) = clip(offset, len);
                let mut buf = vec![0u8; len as usize];
                self.image().read(&mut buf, offset).unwrap();
                assert!(
                    buf == self.model[offset as usize..(offset + len) as usize],
                    "read mismatch at {offset} len {len}"
                );
            }
            Op::Flush => self.image().flush().unwrap(),
            Op::Reopen => {
                self.image.take().unwrap().close().unwrap();
                self.image = Some(Image::open(self.storage.clone(), &self.opts()).unwrap());
            }
            Op::Grow { by } => {
                let new = size + by;
                self.image().resize(new).unwrap();
                self.model.resize(new as usize, 0);
            }
        }
    }

    fn verify_all(&self) {
        let mut buf = vec![0u8; self.model.len()];
        self.image().read(&mut buf, 0).unwrap();
        assert!(
            buf == self.model,
            "whole-disk content differs from the model"
        );
    }
}

fn run(ops: &[Op], cluster_size: u64, refcount_bits: u32, with_backing: bool) {
    let size = 256 * 1024;
    let storage = Arc::new(MemStorage::new());
    let backing = with_backing.then(|| {
        // A backing file smaller than the image: its tail reads as zeros.
        let b = Arc::new(MemStorage::new());
        b.write_at(&pattern(0x5a, 0, size / 2 + 1000), 0).unwrap();
        b
    });
    let mut model = vec![0u8; size as usize];
    if let Some(b) = &backing {
        b.read_at(&mut model[..(size / 2 + 1000) as usize], 0)
            .unwrap();
    }
    let opts = CreateOptions {
        virtual_size: size,
        cluster_size,
        refcount_bits,
        backing_file: with_backing.then(|| "backing.raw".to_string()),
        backing_format: with_backing.then_some(BackingFormat::Raw),
        journal: None,
    };
    Image::create(&*storage, &opts).unwrap();
    let mut h = Harness {
        storage,
        backing,
        image: None,
        model,
    };
    h.image = Some(Image::open(h.storage.clone(), &h.opts()).unwrap());
    for op in ops {
        h.apply(op);
    }
    h.verify_all();
    h.image.take().unwrap().close().unwrap();
    let report =
        qj_engine::check::check(&*h.storage, qj_engine::check::RepairMode::None, &[]).unwrap();
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "check after close: {:?}",
        report.messages
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn small_clusters_match_model(ops in proptest::collection::vec(op_strategy(256 * 1024), 1..60)) {
        run(&ops, 512, 1, false);
    }

    #[test]
    fn default_clusters_match_model(ops in proptest::collection::vec(op_strategy(256 * 1024), 1..60)) {
        run(&ops, 4096, 16, false);
    }

    #[test]
    fn backing_file_matches_model(ops in proptest::collection::vec(op_strategy(256 * 1024), 1..60)) {
        run(&ops, 4096, 64, true);
    }
}
