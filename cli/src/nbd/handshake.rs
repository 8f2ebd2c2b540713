//! The fixed newstyle handshake: greeting, client flags, then options until
//! the client enters transmission (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`)
//! or leaves. A client that breaks a MUST of the protocol gets its
//! connection closed (an `InvalidData` error); anything merely unknown
//! gets the option error the protocol names, and the haggling goes on.

use std::io::{self, Read, Write};

use super::proto::{self, BlockSizes, InfoRequest, MetaContextRequest, OptionHeader};
use super::Export;

/// Most options one connection may send before it must choose an export:
/// a client looping on options is cut off instead of served forever.
pub const OPTIONS_MAX: usize = 256;
/// Longest option data accepted (the longest legal option, a meta context
/// query list, is far below this); a longer one closes the connection.
pub const OPTION_DATA_BYTES_MAX: u32 = 64 << 10;
/// Id of `base:allocation` in block status replies.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Longest READ or WRITE payload (as qemu-nbd).
pub const PAYLOAD_BYTES_MAX: u32 = 32 << 20;
/// Minimum block size promised to clients that ask for block sizes.
pub const BLOCK_BYTES_MIN: u32 = 512;

/// What the handshake agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Negotiated {
    /// Structured replies are on.
    pub structured: bool,
    /// `base:allocation` was selected: BLOCK_STATUS answers with this id.
    pub base_allocation: Option<u32>,
    /// The client asked for block sizes, so it was promised 512-byte
    /// alignment and unaligned requests are errors.
    pub aligned: bool,
}

/// How the handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The client chose the export: serve requests.
    Transmission(Negotiated),
    /// The client left (NBD_OPT_ABORT or a closed connection).
    Ended,
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// The transmission flags of `export`, given what was negotiated.
#[must_use]
pub fn transmission_flags(export: &Export, structured: bool) -> u16 {
    // Every flush is a persist of the whole image, shared by all
    // connections (the engine's flush covers every operation completed
    // before it, whichever thread did it): multi-conn is true.
    let mut flags = proto::TFLAG_HAS_FLAGS
        | proto::TFLAG_SEND_FLUSH
        | proto::TFLAG_SEND_FUA
        | proto::TFLAG_CAN_MULTI_CONN;
    if export.read_only {
        flags |= proto::TFLAG_READ_ONLY;
    } else {
        flags |= proto::TFLAG_SEND_TRIM | proto::TFLAG_SEND_WRITE_ZEROES;
    }
    if structured {
        // Reads always answer with one data chunk, so DF costs nothing.
        flags |= proto::TFLAG_SEND_DF;
    }
    flags
}

/// The block sizes sent to a client; `asked` says whether it asked for them.
/// A client that did not ask may send any alignment (it was never told),
/// so it is promised a minimum of 1, as qemu-nbd does.
#[must_use]
pub fn block_sizes(export: &Export, asked: bool) -> BlockSizes {
    let cluster = export.image.geometry().cluster_size();
    BlockSizes {
        minimum_bytes: if asked { BLOCK_BYTES_MIN } else { 1 },
        preferred_bytes: cluster.clamp(4096, u64::from(PAYLOAD_BYTES_MAX)) as u32,
        maximum_bytes: PAYLOAD_BYTES_MAX,
    }
}

/// Runs the handshake on one connection. `shutting_down` makes every
/// option but ABORT fail with `NBD_REP_ERR_SHUTDOWN`.
pub fn negotiate(
    r: &mut impl Read,
    w: &mut impl Write,
    export: &Export,
    shutting_down: &dyn Fn() -> bool,
) -> io::Result<Outcome> {
    w.write_all(&proto::greeting(
        proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
    ))?;
    w.flush()?;
    let mut client_flags = [0u8; 4];
    if !super::read_or_eof(r, &mut client_flags)? {
        return Ok(Outcome::Ended);
    }
    let client_flags = u32::from_be_bytes(client_flags);
    let known = proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(invalid(format!(
            "unknown client flags {client_flags:#x} (the protocol says to close)"
        )));
    }
    let no_zeroes = client_flags & proto::CLIENT_NO_ZEROES != 0;
    let mut state = Negotiated::default();
    for _ in 0..OPTIONS_MAX {
        let mut header = [0u8; proto::OPTION_HEADER_BYTES];
        if !super::read_or_eof(r, &mut header)? {
            return Ok(Outcome::Ended);
        }
        let header = OptionHeader::decode(&header).map_err(|e| invalid(e.to_string()))?;
        if header.length > OPTION_DATA_BYTES_MAX {
            return Err(invalid(format!(
                "option {} carries {} bytes (at most {OPTION_DATA_BYTES_MAX})",
                header.option, header.length
            )));
        }
        let mut data = vec![0u8; header.length as usize];
        r.read_exact(&mut data)?;
        let opt = header.option;
        let reply = |w: &mut dyn Write, kind: u32, data: &[u8]| -> io::Result<()> {
            w.write_all(&proto::option_reply(opt, kind, data))
        };
        if opt == proto::OPT_EXPORT_NAME {
            // No error reply exists for this option: an unknown name closes.
            let name = String::from_utf8_lossy(&data);
            if name != export.name {
                return Err(invalid(format!("no export named '{name}'")));
            }
            let flags = transmission_flags(export, state.structured);
            w.write_all(&proto::export_name_reply(
                export.image.virtual_size(),
                flags,
                no_zeroes,
            ))?;
            w.flush()?;
            return Ok(Outcome::Transmission(state));
        }
        if opt == proto::OPT_ABORT {
            // The client may already be gone: the ACK is best effort.
            let _ = reply(w, proto::REP_ACK, &[]).and_then(|()| w.flush());
            return Ok(Outcome::Ended);
        }
        if shutting_down() {
            reply(w, proto::REP_ERR_SHUTDOWN, b"the server is shutting down")?;
            w.flush()?;
            continue;
        }
        match opt {
            proto::OPT_LIST => {
                if data.is_empty() {
                    reply(w, proto::REP_SERVER, &proto::server_data(&export.name))?;
                    reply(w, proto::REP_ACK, &[])?;
                } else {
                    reply(w, proto::REP_ERR_INVALID, b"NBD_OPT_LIST carries no data")?;
                }
            }
            proto::OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    state.structured = true;
                    reply(w, proto::REP_ACK, &[])?;
                } else {
                    reply(
                        w,
                        proto::REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY carries no data",
                    )?;
                }
            }
            proto::OPT_INFO | proto::OPT_GO => match InfoRequest::decode(&data) {
                Err(e) => reply(w, proto::REP_ERR_INVALID, e.to_string().as_bytes())?,
                Ok(req) if req.name != export.name => reply(
                    w,
                    proto::REP_ERR_UNKNOWN,
                    format!("no export named '{}'", req.name).as_bytes(),
                )?,
                Ok(req) => {
                    let asked = req.requests.contains(&proto::INFO_BLOCK_SIZE);
                    let flags = transmission_flags(export, state.structured);
                    reply(
                        w,
                        proto::REP_INFO,
                        &proto::info_export(export.image.virtual_size(), flags),
                    )?;
                    reply(
                        w,
                        proto::REP_INFO,
                        &proto::info_block_size(block_sizes(export, asked)),
                    )?;
                    if req.requests.contains(&proto::INFO_NAME) {
                        reply(w, proto::REP_INFO, &proto::info_name(&export.name))?;
                    }
                    reply(w, proto::REP_ACK, &[])?;
                    if opt == proto::OPT_GO {
                        w.flush()?;
                        state.aligned = asked;
                        return Ok(Outcome::Transmission(state));
                    }
                }
            },
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                let set = opt == proto::OPT_SET_META_CONTEXT;
                match MetaContextRequest::decode(&data) {
                    _ if !state.structured => reply(
                        w,
                        proto::REP_ERR_INVALID,
                        b"negotiate structured replies before metadata contexts",
                    )?,
                    Err(e) => reply(w, proto::REP_ERR_INVALID, e.to_string().as_bytes())?,
                    Ok(req) if req.name != export.name => reply(
                        w,
                        proto::REP_ERR_UNKNOWN,
                        format!("no export named '{}'", req.name).as_bytes(),
                    )?,
                    Ok(req) => {
                        // LIST without queries lists everything; SET
                        // without queries selects nothing.
                        let selected = (!set && req.queries.is_empty())
                            || req
                                .queries
                                .iter()
                                .any(|q| proto::query_selects_base_allocation(q));
                        if set {
                            state.base_allocation = selected.then_some(BASE_ALLOCATION_ID);
                        }
                        if selected {
                            let id = if set { BASE_ALLOCATION_ID } else { 0 };
                            reply(
                                w,
                                proto::REP_META_CONTEXT,
                                &proto::meta_context_data(id, proto::BASE_ALLOCATION),
                            )?;
                        }
                        reply(w, proto::REP_ACK, &[])?;
                    }
                }
            }
            _ => reply(
                w,
                proto::REP_ERR_UNSUP,
                format!("option {opt} is not supported").as_bytes(),
            )?,
        }
        w.flush()?;
    }
    Err(invalid(format!(
        "more than {OPTIONS_MAX} options without choosing an export"
    )))
}
