//! The journal's two header slots. Each slot is tried as it is and
//! resealed (its CRC32C recomputed), so that the fuzzer reaches the field
//! checks behind the checksum. A decoded slot re-encodes to its defined
//! fields byte for byte (bytes 0..56), and to the whole slot when the
//! reserved bytes are zero as writers leave them; the slot chosen is a
//! valid one with the larger generation.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qj_spec::journal::checksum::crc32c;
use qj_spec::journal::header::HEADER_CRC_OFFSET;
use qj_spec::journal::JournalHeader;

const SLOT_BYTES: usize = 512;
/// End of the defined fields; 56..508 are reserved.
const FIELDS_END: usize = 56;

fn resealed(slot: &[u8; SLOT_BYTES]) -> [u8; SLOT_BYTES] {
    let mut out = *slot;
    let crc = crc32c(&out[..HEADER_CRC_OFFSET]);
    out[HEADER_CRC_OFFSET..HEADER_CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
    out
}

fn slot(data: &[u8], index: usize) -> [u8; SLOT_BYTES] {
    let mut out = [0u8; SLOT_BYTES];
    if let Some(bytes) = data.get(index * SLOT_BYTES..) {
        let n = bytes.len().min(SLOT_BYTES);
        out[..n].copy_from_slice(&bytes[..n]);
    }
    out
}

fn round_trip(bytes: &[u8; SLOT_BYTES]) -> Option<JournalHeader> {
    let header = JournalHeader::decode(bytes).ok()?;
    let encoded = header.encode();
    assert_eq!(
        encoded[..FIELDS_END],
        bytes[..FIELDS_END],
        "a decoded journal header slot does not re-encode its fields"
    );
    if bytes[FIELDS_END..HEADER_CRC_OFFSET].iter().all(|&b| b == 0) {
        assert_eq!(
            encoded[..],
            bytes[..],
            "a canonical slot does not re-encode"
        );
    }
    assert_eq!(JournalHeader::decode(&encoded), Ok(header));
    assert!(header.tail_block < header.geometry.ring_blocks());
    Some(header)
}

fuzz_target!(|data: &[u8]| {
    // The decoder must refuse a short slot, not read past it.
    let short = data.len().min(SLOT_BYTES - 1);
    assert!(JournalHeader::decode(&data[..short]).is_err());

    let slots = [slot(data, 0), slot(data, 1)];
    for sealed in [false, true] {
        let [a, b] = if sealed {
            [resealed(&slots[0]), resealed(&slots[1])]
        } else {
            slots
        };
        let decoded = [round_trip(&a), round_trip(&b)];
        // The slot rule (spec 4.2): the newest sealed slot is in charge and
        // is then decoded; an older slot is never fallen back to.
        match JournalHeader::newest_sealed(&a, &b) {
            Err(_) => {
                assert!(JournalHeader::unseal(&a).is_err() && JournalHeader::unseal(&b).is_err());
                assert_eq!(decoded, [None, None], "a decodable slot must be sealed");
            }
            Ok(i) => {
                let (chosen, other) = if i == 0 { (&a, &b) } else { (&b, &a) };
                let generation = JournalHeader::unseal(chosen).expect("the chosen slot is sealed");
                if let Ok(g) = JournalHeader::unseal(other) {
                    assert!(generation >= g, "an older slot was chosen");
                }
                match JournalHeader::decode(chosen) {
                    Ok(h) => assert_eq!(Some(h), decoded[i]),
                    Err(_) => assert_eq!(decoded[i], None),
                }
            }
        }
    }
});
