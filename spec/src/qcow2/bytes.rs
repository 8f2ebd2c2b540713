//! Bounds-checked big-endian field readers shared by the qcow2 decoders:
//! every read of a disk-derived position goes through here, so a short
//! buffer becomes a [`FormatError::Truncated`] instead of a panic.

use crate::error::FormatError;

/// Returns `bytes[offset..offset + N]`, or `Truncated` naming `structure`.
pub(crate) fn array<const N: usize>(
    bytes: &[u8],
    offset: usize,
    structure: &'static str,
) -> Result<[u8; N], FormatError> {
    let end = offset.checked_add(N).ok_or(FormatError::Truncated {
        structure,
        need: u64::MAX,
        have: bytes.len() as u64,
    })?;
    let slice = bytes.get(offset..end).ok_or(FormatError::Truncated {
        structure,
        need: end as u64,
        have: bytes.len() as u64,
    })?;
    let mut out = [0u8; N];
    out.copy_from_slice(slice);
    Ok(out)
}

/// Big-endian `u16` at `offset`.
pub(crate) fn be_u16(
    bytes: &[u8],
    offset: usize,
    structure: &'static str,
) -> Result<u16, FormatError> {
    Ok(u16::from_be_bytes(array(bytes, offset, structure)?))
}

/// Big-endian `u32` at `offset`.
pub(crate) fn be_u32(
    bytes: &[u8],
    offset: usize,
    structure: &'static str,
) -> Result<u32, FormatError> {
    Ok(u32::from_be_bytes(array(bytes, offset, structure)?))
}

/// Big-endian `u64` at `offset`.
pub(crate) fn be_u64(
    bytes: &[u8],
    offset: usize,
    structure: &'static str,
) -> Result<u64, FormatError> {
    Ok(u64::from_be_bytes(array(bytes, offset, structure)?))
}

/// `bytes[offset..offset + len]`, or `Truncated`.
pub(crate) fn slice<'a>(
    bytes: &'a [u8],
    offset: usize,
    len: usize,
    structure: &'static str,
) -> Result<&'a [u8], FormatError> {
    let end = offset.checked_add(len).ok_or(FormatError::Truncated {
        structure,
        need: u64::MAX,
        have: bytes.len() as u64,
    })?;
    bytes.get(offset..end).ok_or(FormatError::Truncated {
        structure,
        need: end as u64,
        have: bytes.len() as u64,
    })
}

/// Rounds `n` up to a multiple of 8 (qcow2 pads extensions, snapshot and
/// bitmap directory entries to 8 bytes), or `None` on overflow.
pub(crate) fn pad8(n: usize) -> Option<usize> {
    n.checked_add(7).map(|n| n & !7)
}
