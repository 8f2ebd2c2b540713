//! The NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`) as pure
//! code: constants, and encoders and decoders of the messages the server
//! sends and receives. No I/O happens here, so every parser can be fed
//! arbitrary bytes in tests.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after EXPORT_NAME.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag that must always be set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: NBD_CMD_FLUSH is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: NBD_CMD_FLAG_FUA is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: NBD_CMD_TRIM is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: NBD_CMD_WRITE_ZEROES is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: NBD_CMD_FLAG_DF is supported on reads.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: a flush on one connection covers every connection.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: choose the export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the session.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: accepted, or the end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of export information.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
/// Option error: the option is malformed.
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) | 7;

/// Information type: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: the export's name.
pub const INFO_NAME: u16 = 1;
/// Information type: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the request).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: make completed writes durable.
pub const CMD_FLUSH: u16 = 3;
/// Command: discard.
pub const CMD_TRIM: u16 = 4;
/// Command: make a range read as zeros.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: report allocation status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: reply only once the command's writes are durable.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag on WRITE_ZEROES: do not deallocate.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag on READ: at most one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag on BLOCK_STATUS: one extent is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply flag: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply type: block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured reply type: an error with a message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// `base:allocation` flag: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context this server knows.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// NBD error: not permitted (a write to a read-only export).
pub const EPERM: u32 = 1;
/// NBD error: input/output error.
pub const EIO: u32 = 5;
/// NBD error: invalid argument.
pub const EINVAL: u32 = 22;
/// NBD error: no space (a write past the end of the export).
pub const ENOSPC: u32 = 28;

/// Bytes of a transmission request header.
pub const REQUEST_BYTES: usize = 28;
/// Bytes of a client option header (magic, option, length).
pub const OPTION_HEADER_BYTES: usize = 16;
/// Longest string (export name, context query) the protocol allows.
pub const STRING_BYTES_MAX: usize = 4096;

/// A transmission request header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub command: u16,
    /// The client's handle, echoed in the reply.
    pub handle: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes (of the payload for a write).
    pub length: u32,
}

/// Why bytes are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The magic number is wrong: the stream is out of step.
    #[error("bad magic {found:#x} (expected {expected:#x})")]
    BadMagic {
        /// What was received.
        found: u64,
        /// What the protocol requires here.
        expected: u64,
    },
    /// A length field disagrees with the bytes that carry it.
    #[error("malformed {what}")]
    Malformed {
        /// Which message.
        what: &'static str,
    },
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

impl Request {
    /// Decodes a request header.
    pub fn decode(b: &[u8; REQUEST_BYTES]) -> Result<Request, WireError> {
        let magic = be32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic {
                found: magic.into(),
                expected: REQUEST_MAGIC.into(),
            });
        }
        Ok(Request {
            flags: be16(b, 4),
            command: be16(b, 6),
            handle: be64(b, 8),
            offset: be64(b, 16),
            length: be32(b, 24),
        })
    }

    /// Encodes the header as a client sends it (the tests' client, the
    /// fuzzer's round trip).
    #[must_use]
    pub fn encode(&self) -> [u8; REQUEST_BYTES] {
        let mut b = [0u8; REQUEST_BYTES];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A client option header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number (`OPT_*`).
    pub option: u32,
    /// Bytes of option data that follow.
    pub length: u32,
}

impl OptionHeader {
    /// Decodes an option header.
    pub fn decode(b: &[u8; OPTION_HEADER_BYTES]) -> Result<OptionHeader, WireError> {
        let magic = be64(b, 0);
        if magic != IHAVEOPT {
            return Err(WireError::BadMagic {
                found: magic,
                expected: IHAVEOPT,
            });
        }
        Ok(OptionHeader {
            option: be32(b, 8),
            length: be32(b, 12),
        })
    }
}

/// The server's first 18 bytes.
#[must_use]
pub fn greeting(handshake_flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// An option reply: header and data.
#[must_use]
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply_type.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The data of `NBD_REP_SERVER`: the export's name.
#[must_use]
pub fn server_data(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// The data of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
#[must_use]
pub fn info_export(size: u64, transmission_flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&transmission_flags.to_be_bytes());
    b
}

/// The data of `NBD_REP_INFO` / `NBD_INFO_NAME`.
#[must_use]
pub fn info_name(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + name.len());
    b.extend_from_slice(&INFO_NAME.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// Block size constraints, as NBD_INFO_BLOCK_SIZE sends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Every offset and length must be a multiple of this.
    pub minimum_bytes: u32,
    /// Requests of this size and alignment are efficient.
    pub preferred_bytes: u32,
    /// Longest READ or WRITE payload.
    pub maximum_bytes: u32,
}

/// The data of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
#[must_use]
pub fn info_block_size(sizes: BlockSizes) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&sizes.minimum_bytes.to_be_bytes());
    b.extend_from_slice(&sizes.preferred_bytes.to_be_bytes());
    b.extend_from_slice(&sizes.maximum_bytes.to_be_bytes());
    b
}

/// The data of `NBD_REP_META_CONTEXT`.
#[must_use]
pub fn meta_context_data(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes
/// unless the client asked for none.
#[must_use]
pub fn export_name_reply(size: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export asked for.
    pub name: String,
    /// The information types asked for.
    pub requests: Vec<u16>,
}

/// A cursor over option data that fails instead of reading past the end.
struct Fields<'a> {
    data: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Fields<'a> {
    fn new(data: &'a [u8], what: &'static str) -> Self {
        Fields { data, at: 0, what }
    }

    fn malformed(&self) -> WireError {
        WireError::Malformed { what: self.what }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).ok_or_else(|| self.malformed())?;
        let out = self
            .data
            .get(self.at..end)
            .ok_or_else(|| self.malformed())?;
        self.at = end;
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        self.bytes(2).map(|b| be16(b, 0))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        self.bytes(4).map(|b| be32(b, 0))
    }

    /// A 32-bit length followed by that many bytes of UTF-8.
    fn string(&mut self) -> Result<String, WireError> {
        let n = self.u32()? as usize;
        if n > STRING_BYTES_MAX {
            return Err(self.malformed());
        }
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.malformed())
    }

    fn end(&self) -> Result<(), WireError> {
        if self.at == self.data.len() {
            Ok(())
        } else {
            Err(self.malformed())
        }
    }
}

impl InfoRequest {
    /// Decodes INFO/GO data: name length, name, count, info types.
    pub fn decode(data: &[u8]) -> Result<InfoRequest, WireError> {
        let mut f = Fields::new(data, "NBD_OPT_INFO/GO data");
        let name = f.string()?;
        let count = f.u16()?;
        let requests = (0..count).map(|_| f.u16()).collect::<Result<Vec<_>, _>>()?;
        f.end()?;
        Ok(InfoRequest { name, requests })
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export the contexts are for.
    pub name: String,
    /// The queries.
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Decodes: name length, name, query count, each query with its length.
    pub fn decode(data: &[u8]) -> Result<MetaContextRequest, WireError> {
        let mut f = Fields::new(data, "NBD_OPT_*_META_CONTEXT data");
        let name = f.string()?;
        let count = f.u32()?;
        // Each query takes at least its 4-byte length: a count the data
        // cannot hold is malformed, and the loop stays bounded by the data.
        if count as usize > data.len() / 4 {
            return Err(f.malformed());
        }
        let queries = (0..count)
            .map(|_| f.string())
            .collect::<Result<Vec<_>, _>>()?;
        f.end()?;
        Ok(MetaContextRequest { name, queries })
    }
}

/// The contexts a query names: `base:allocation` itself, the `base:`
/// namespace, or (for LIST only) everything when there is no query.
#[must_use]
pub fn query_selects_base_allocation(query: &str) -> bool {
    query == BASE_ALLOCATION || query == "base:"
}

/// A simple reply header.
#[must_use]
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header; `length` bytes of payload follow.
#[must_use]
pub fn chunk_header(flags: u16, reply_type: u16, handle: u64, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&reply_type.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a message for people.
#[must_use]
pub fn error_chunk(handle: u64, error: u32, message: &str) -> Vec<u8> {
    // The message length field is 16 bits; strings should stay short anyway.
    let message = &message.as_bytes()[..message.len().min(1024)];
    let payload_len = 6 + message.len();
    let mut b = Vec::with_capacity(20 + payload_len);
    b.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        payload_len as u32,
    ));
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(message.len() as u16).to_be_bytes());
    b.extend_from_slice(message);
    b
}

/// One block status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (never zero).
    pub length: u32,
    /// `STATE_*` flags.
    pub flags: u32,
}

/// A final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one context.
#[must_use]
pub fn block_status_chunk(handle: u64, context_id: u32, extents: &[Extent]) -> Vec<u8> {
    let payload_len = 4 + 8 * extents.len();
    let mut b = Vec::with_capacity(20 + payload_len);
    b.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        payload_len as u32,
    ));
    b.extend_from_slice(&context_id.to_be_bytes());
    for e in extents {
        b.extend_from_slice(&e.length.to_be_bytes());
        b.extend_from_slice(&e.flags.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_header_layout() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(&b[16..24], &4096u64.to_be_bytes());
        assert_eq!(Request::decode(&b), Ok(r));
    }

    #[test]
    fn wrong_request_magic_is_named() {
        let mut b = [0u8; REQUEST_BYTES];
        b[0] = 0x67;
        assert!(matches!(
            Request::decode(&b),
            Err(WireError::BadMagic {
                found: 0x6700_0000,
                ..
            })
        ));
    }

    #[test]
    fn info_request_decodes_and_rejects_bad_lengths() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vda");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            InfoRequest::decode(&d),
            Ok(InfoRequest {
                name: "vda".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
        // One byte short, one byte extra, a name longer than the data.
        assert!(InfoRequest::decode(&d[..d.len() - 1]).is_err());
        let mut extra = d.clone();
        extra.push(0);
        assert!(InfoRequest::decode(&extra).is_err());
        let mut long = d.clone();
        long[3] = 200;
        assert!(InfoRequest::decode(&long).is_err());
    }

    #[test]
    fn meta_context_request_decodes() {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let r = MetaContextRequest::decode(&d).unwrap();
        assert_eq!(r.name, "");
        assert_eq!(r.queries, vec!["base:allocation", "qemu:dirty-bitmap:x"]);
        // A count larger than the data could hold.
        let mut huge = d.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(MetaContextRequest::decode(&huge).is_err());
    }

    #[test]
    fn reply_layouts() {
        assert_eq!(
            option_reply(OPT_GO, REP_ACK, &[]),
            [0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]
        );
        assert_eq!(export_name_reply(1, 3, false).len(), 134);
        assert_eq!(export_name_reply(1, 3, true).len(), 10);
        let e = error_chunk(9, EINVAL, "bad");
        assert_eq!(e.len(), 20 + 6 + 3);
        assert_eq!(&e[4..8], &[0, 1, 0x80, 1]);
        let bs = block_status_chunk(
            9,
            1,
            &[Extent {
                length: 512,
                flags: STATE_HOLE | STATE_ZERO,
            }],
        );
        assert_eq!(&bs[16..20], &12u32.to_be_bytes());
        assert_eq!(&bs[28..32], &3u32.to_be_bytes());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = InfoRequest::decode(&data);
            let _ = MetaContextRequest::decode(&data);
            if data.len() >= REQUEST_BYTES {
                let mut h = [0u8; REQUEST_BYTES];
                h.copy_from_slice(&data[..REQUEST_BYTES]);
                let _ = Request::decode(&h);
            }
            if data.len() >= OPTION_HEADER_BYTES {
                let mut h = [0u8; OPTION_HEADER_BYTES];
                h.copy_from_slice(&data[..OPTION_HEADER_BYTES]);
                let _ = OptionHeader::decode(&h);
            }
        }

        #[test]
        fn requests_round_trip(flags: u16, command: u16, handle: u64, offset: u64, length: u32) {
            let r = Request { flags, command, handle, offset, length };
            prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
        }
    }
}
