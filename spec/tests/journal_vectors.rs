//! The byte-exact test vectors of `spec/qjournal.md`, checked against the
//! code both ways: the encoders must produce the documented bytes, and the
//! decoders must read back the documented values. The checksums are also
//! recomputed with an independent bitwise CRC32C, so the vectors do not
//! merely restate what the crc32c crate computes.

use qj_spec::journal::{
    block::BLOCK_CRC_OFFSET, encode_padding, encode_transaction, parse_transaction,
    verify_transaction, BlockHeader, BlockType, CopyChunk, DataChecksumChunk, DedupEntry,
    Descriptor, JournalGeometry, JournalHeader, RevokeRange, TargetBounds, TransactionParams,
    WriteChunk,
};

const JOURNAL_ID: u64 = 0x0123_4567_89ab_cdef;

/// CRC-32C, reflected polynomial 0x82F63B78, bit by bit.
fn crc32c_bitwise(init: u32, bytes: &[u8]) -> u32 {
    let mut crc = !init;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Vectors in the document: fenced blocks whose info string is
/// `qjvector NAME LEN`, holding `OFFSET  BYTES...` lines in hex; bytes of
/// lines not shown are zero.
fn vectors() -> Vec<(String, Vec<u8>)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/qjournal.md"))
        .expect("spec/qjournal.md");
    let mut out = Vec::new();
    let mut current: Option<(String, Vec<u8>)> = None;
    for line in doc.lines() {
        if let Some(info) = line.strip_prefix("```qjvector ") {
            let mut words = info.split_whitespace();
            let name = words.next().expect("vector name").to_string();
            let len: usize = words
                .next()
                .expect("vector length")
                .parse()
                .expect("length");
            current = Some((name, vec![0u8; len]));
        } else if line.starts_with("```") {
            if let Some(done) = current.take() {
                out.push(done);
            }
        } else if let Some((name, bytes)) = current.as_mut() {
            let mut words = line.split_whitespace();
            let Some(offset) = words.next() else { continue };
            let offset = usize::from_str_radix(offset, 16)
                .unwrap_or_else(|_| panic!("{name}: bad offset {offset}"));
            for (i, word) in words.enumerate() {
                bytes[offset + i] = u8::from_str_radix(word, 16)
                    .unwrap_or_else(|_| panic!("{name}: bad byte {word}"));
            }
        }
    }
    out
}

fn vector(name: &str) -> Vec<u8> {
    vectors()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("vector {name} missing from qjournal.md"))
        .1
}

/// Renders bytes in the document's notation, for a failing comparison.
fn render(name: &str, bytes: &[u8]) -> String {
    let mut out = format!("```qjvector {name} {}\n", bytes.len());
    for (row, chunk) in bytes.chunks(16).enumerate() {
        if chunk.iter().any(|b| *b != 0) {
            let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            out += &format!("{:04x}  {}\n", row * 16, hex.join(" "));
        }
    }
    out + "```\n"
}

fn assert_vector(name: &str, encoded: &[u8]) {
    let documented = vector(name);
    assert!(
        documented == encoded,
        "vector {name} differs from the encoder; the encoder gives:\n{}",
        render(name, encoded)
    );
}

fn header() -> JournalHeader {
    JournalHeader {
        geometry: JournalGeometry::new(9, 1024 + 8 * 512).unwrap(),
        journal_id: JOURNAL_ID,
        generation: 3,
        synced_seq: 41,
        tail_block: 2,
    }
}

fn transaction() -> (TransactionParams, Vec<Descriptor>, Vec<u8>) {
    let params = TransactionParams {
        journal_id: JOURNAL_ID,
        seq: 42,
        durable_seq: 40,
        block_size: 512,
    };
    let descriptors = vec![
        Descriptor::NoOp { size_bytes: 8 },
        Descriptor::WriteData(vec![
            WriteChunk {
                target: 0x10000,
                length: 512,
                data_offset: 0,
            },
            WriteChunk {
                target: 0x20000,
                length: 88,
                data_offset: 512,
            },
        ]),
        Descriptor::Copy(vec![CopyChunk {
            target: 0x30000,
            source: 0x40000,
            length: 0x1000,
        }]),
        Descriptor::Revoke(vec![RevokeRange {
            offset: 0x50000,
            length: 0x10000,
        }]),
        Descriptor::DedupInsert(vec![DedupEntry {
            host_offset: 0x60000,
            hash_algorithm: 1,
            hash: (0..32).collect(),
        }]),
        Descriptor::DedupDelete(vec![DedupEntry {
            host_offset: 0x70000,
            hash_algorithm: 1,
            hash: vec![0xaa; 5],
        }]),
        Descriptor::DataChecksum(vec![DataChecksumChunk {
            target: 0x80000,
            length: 0x1000,
            crc32c: 0xcafe_f00d,
        }]),
    ];
    // Data block 0: an L2 table with two entries; data block 1 happens to
    // start with the block magic.
    let mut data = vec![0u8; 512];
    data[..8].copy_from_slice(&0x8000_0000_0005_0000u64.to_be_bytes());
    data[8..16].copy_from_slice(&0x8000_0000_0006_0000u64.to_be_bytes());
    data.extend_from_slice(b"qjbk");
    data.extend_from_slice(&[0x22u8; 84]);
    (params, descriptors, data)
}

#[test]
fn independent_crc32c_agrees_with_the_check_value() {
    assert_eq!(crc32c_bitwise(0, b"123456789"), 0xe306_9283);
    assert_eq!(
        qj_spec::journal::checksum::crc32c(b"123456789"),
        0xe306_9283
    );
}

#[test]
fn header_slot_vector() {
    let bytes = header().encode();
    assert_vector("header-slot", &bytes);
    let documented = vector("header-slot");
    assert_eq!(JournalHeader::decode(&documented), Ok(header()));
    assert_eq!(&documented[..8], b"qjournal");
    let crc = u32::from_be_bytes(documented[508..512].try_into().unwrap());
    assert_eq!(crc, crc32c_bitwise(0, &documented[..508]));
}

#[test]
fn header_area_vector() {
    // A header update: the header goes to slot generation % 2 (slot 1),
    // then its mirror, one generation later, to the other slot.
    let header = header();
    let mirror = header.mirror();
    let mut area = vec![0u8; 1024];
    area[header.slot() * 512..][..512].copy_from_slice(&header.encode());
    area[mirror.slot() * 512..][..512].copy_from_slice(&mirror.encode());
    assert_vector("header-area", &area);
    let documented = vector("header-area");
    let (slot0, slot1) = documented.split_at(512);
    assert_eq!(JournalHeader::newest_sealed(slot0, slot1), Ok(0));
    assert_eq!(JournalHeader::decode(slot0), Ok(mirror));
    assert_eq!(JournalHeader::decode(slot1), Ok(header));
    // The two slots differ in the generation and the checksum only.
    let differing: Vec<usize> = (0..512).filter(|i| slot0[*i] != slot1[*i]).collect();
    assert!(
        differing.iter().all(|i| (32..40).contains(i) || *i >= 508),
        "{differing:?}"
    );
    for slot in [slot0, slot1] {
        let crc = u32::from_be_bytes(slot[508..512].try_into().unwrap());
        assert_eq!(crc, crc32c_bitwise(0, &slot[..508]));
    }
}

#[test]
fn reserved_byte_vector() {
    // A padding block with a non-zero reserved byte, sealed: it passes its
    // checksum and is refused as a field error, never taken as the end of
    // the log.
    let mut bytes = encode_padding(512, JOURNAL_ID, 43);
    bytes[7] = 1;
    bytes[BLOCK_CRC_OFFSET..BLOCK_CRC_OFFSET + 4].fill(0);
    let crc = qj_spec::journal::checksum::block_checksum(JOURNAL_ID, 43, &bytes, BLOCK_CRC_OFFSET);
    bytes[BLOCK_CRC_OFFSET..BLOCK_CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
    assert_vector("reserved-byte", &bytes);
    let documented = vector("reserved-byte");
    let mut salted = JOURNAL_ID.to_be_bytes().to_vec();
    salted.extend_from_slice(&43u64.to_be_bytes());
    let mut zeroed = documented.clone();
    zeroed[BLOCK_CRC_OFFSET..BLOCK_CRC_OFFSET + 4].fill(0);
    salted.extend_from_slice(&zeroed);
    let crc = u32::from_be_bytes(documented[28..32].try_into().unwrap());
    assert_eq!(crc, crc32c_bitwise(0, &salted), "the checksum holds");
    let err = BlockHeader::decode(&documented, JOURNAL_ID).unwrap_err();
    assert!(!err.is_integrity(), "{err}");
    assert!(
        matches!(
            err,
            qj_spec::journal::JournalFormatError::Field {
                field: "reserved",
                offset: 6,
                value: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn padding_block_vector() {
    let bytes = encode_padding(512, JOURNAL_ID, 43);
    assert_vector("padding-block", &bytes);
    let documented = vector("padding-block");
    let block = BlockHeader::decode(&documented, JOURNAL_ID).unwrap();
    assert_eq!((block.block_type, block.seq), (BlockType::Padding, 43));
    let mut salt = JOURNAL_ID.to_be_bytes().to_vec();
    salt.extend_from_slice(&43u64.to_be_bytes());
    let mut zeroed = documented.clone();
    zeroed[BLOCK_CRC_OFFSET..BLOCK_CRC_OFFSET + 4].fill(0);
    salt.extend_from_slice(&zeroed);
    let crc = u32::from_be_bytes(documented[28..32].try_into().unwrap());
    assert_eq!(crc, crc32c_bitwise(0, &salt), "salted block checksum");
}

#[test]
fn transaction_vector() {
    let (params, descriptors, data) = transaction();
    let encoded = encode_transaction(&params, &descriptors, &data).unwrap();
    assert_vector("transaction", &encoded.bytes);
    let documented = vector("transaction");
    let header = verify_transaction(&documented, JOURNAL_ID, 512, 42).unwrap();
    assert_eq!(
        (
            header.descriptor_blocks,
            header.data_blocks,
            header.durable_seq
        ),
        (1, 2, 40)
    );
    let parsed = parse_transaction(
        &documented,
        &header,
        512,
        &TargetBounds::outside_journal(0, 0x5000),
    )
    .unwrap();
    let mut want = descriptors.clone();
    want.push(Descriptor::Escape(vec![1]));
    assert_eq!(parsed.descriptors, want);
    assert_eq!(&parsed.data[..600], &data[..]);
    // The stored data block 1 has its magic escaped to zeros.
    assert_eq!(&documented[1024..1028], &[0, 0, 0, 0]);
    // The commit block's transaction checksum, recomputed independently.
    let mut covered = JOURNAL_ID.to_be_bytes().to_vec();
    covered.extend_from_slice(&42u64.to_be_bytes());
    covered.extend_from_slice(&documented[..1536]);
    let stored = u32::from_be_bytes(documented[1536 + 40..1536 + 44].try_into().unwrap());
    assert_eq!(stored, crc32c_bitwise(0, &covered));
}

#[test]
fn every_vector_in_the_document_is_checked() {
    let names: Vec<String> = vectors().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "header-slot",
            "header-area",
            "padding-block",
            "reserved-byte",
            "transaction"
        ]
    );
}
