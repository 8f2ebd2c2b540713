//! Bounds-checked big-endian field access for the journal decoders: every
//! read of a disk-derived position goes through here, so a short buffer is a
//! [`JournalFormatError::Truncated`] and never a panic.

use super::error::JournalFormatError;

/// `bytes[offset..offset + N]` as an array.
pub(crate) fn array<const N: usize>(
    bytes: &[u8],
    offset: usize,
    structure: &'static str,
) -> Result<[u8; N], JournalFormatError> {
    let slice = slice(bytes, offset, N, structure)?;
    let mut out = [0u8; N];
    out.copy_from_slice(slice);
    Ok(out)
}

/// `bytes[offset..offset + len]`.
pub(crate) fn slice<'a>(
    bytes: &'a [u8],
    offset: usize,
    len: usize,
    structure: &'static str,
) -> Result<&'a [u8], JournalFormatError> {
    let truncated = |need: u64| JournalFormatError::Truncated {
        structure,
        need_bytes: need,
        have_bytes: bytes.len() as u64,
    };
    let end = offset.checked_add(len).ok_or_else(|| truncated(u64::MAX))?;
    bytes.get(offset..end).ok_or_else(|| truncated(end as u64))
}

/// Big-endian `u16` at `offset`.
pub(crate) fn be_u16(
    bytes: &[u8],
    offset: usize,
    structure: &'static str,
) -> Result<u16, JournalFormatError> {
    Ok(u16::from_be_bytes(array(bytes, offset, structure)?))
}

/// Big-endian `u32` at `offset`.
pub(crate) fn be_u32(
    bytes: &[u8],
    offset: usize,
    structure: &'static str,
) -> Result<u32, JournalFormatError> {
    Ok(u32::from_be_bytes(array(bytes, offset, structure)?))
}

/// Big-endian `u64` at `offset`.
pub(crate) fn be_u64(
    bytes: &[u8],
    offset: usize,
    structure: &'static str,
) -> Result<u64, JournalFormatError> {
    Ok(u64::from_be_bytes(array(bytes, offset, structure)?))
}

/// Writes `value` big-endian at `offset`; the encoders size their buffers
/// themselves, so an out-of-range offset is a bug in this crate.
pub(crate) fn put_u16(buf: &mut [u8], offset: usize, value: u16) {
    buf[offset..offset + 2].copy_from_slice(&value.to_be_bytes());
}

/// Writes `value` big-endian at `offset` (see [`put_u16`]).
pub(crate) fn put_u32(buf: &mut [u8], offset: usize, value: u32) {
    buf[offset..offset + 4].copy_from_slice(&value.to_be_bytes());
}

/// Writes `value` big-endian at `offset` (see [`put_u16`]).
pub(crate) fn put_u64(buf: &mut [u8], offset: usize, value: u64) {
    buf[offset..offset + 8].copy_from_slice(&value.to_be_bytes());
}

/// Checks that the reserved bytes `bytes[from..]` are zero, the one rule
/// for every reserved byte of a checksummed structure (spec 1): writers
/// write zeros, readers refuse anything else as a field error, so that a
/// block that passes its checksum is never mistaken for the end of a log.
/// `base` is the offset of `bytes` in the caller's structure.
pub(crate) fn reserved_zero(
    bytes: &[u8],
    from: usize,
    base: u64,
    structure: &'static str,
) -> Result<(), JournalFormatError> {
    let tail = bytes.get(from..).unwrap_or(&[]);
    match tail.iter().position(|b| *b != 0) {
        None => Ok(()),
        Some(at) => Err(JournalFormatError::field(
            structure,
            "reserved",
            base + (from + at) as u64,
            u64::from(tail[at]),
            "reserved bytes must be zero",
        )),
    }
}
