//! The NBD server's protocol engine (`qj serve` without its socket), fed a
//! client byte stream, on an in-memory image. The first input byte picks
//! the setup: the image's backend (flush ordering, journal, or journal with
//! deduplication), a read-only export, and whether the fuzzer's bytes are
//! the whole client stream (the handshake fuzzed) or follow a well-formed
//! handshake (the requests fuzzed), with simple or structured replies. In the second case the rest
//! of the input is read as a list of requests (command, flags, offset,
//! length, a magic that may be wrong), each sent with a payload when it is
//! a write. Asserted beyond "no panic":
//!
//! - the server's first bytes are the greeting;
//! - with simple replies, every reply is well formed and answers the next
//!   request in order; a successful read returns exactly the bytes that
//!   the successful writes and zeroings before it left (trimmed bytes may
//!   read as anything), and so does the whole disk afterwards;
//! - a read-only export leaves the image byte for byte as it was;
//! - after the connection ends and the image is closed, `check` finds no
//!   corruption and no leak.

#![no_main]

use std::io::Cursor;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use qj_cli::nbd::{proto, serve_connection, Export};
use qj_engine::check::{check, RepairMode};
use qj_engine::{CreateOptions, Image, JournalConfig, MemStorage, OpenOptions, Storage};

/// The export's size: small, so that requests land inside it often.
const DISK_BYTES: u64 = 256 << 10;
/// Most requests taken from one input.
const REQUESTS_MAX: usize = 64;
/// Largest write payload the target sends (a larger length is sent with
/// its header only, and the stream ends there, inside the payload).
const PAYLOAD_BYTES_MAX: u32 = 128 << 10;

struct Setup {
    journal: bool,
    /// Deduplicate whole clusters (journal images only).
    dedup: bool,
    read_only: bool,
    handshake_fuzzed: bool,
    structured: bool,
}

/// A new image, and its bytes before the server opens it.
fn image(journal: bool, dedup: bool, read_only: bool) -> (Arc<MemStorage>, Image, Vec<u8>) {
    let storage = Arc::new(MemStorage::new());
    let opts = CreateOptions {
        virtual_size: DISK_BYTES,
        cluster_size: 4096,
        journal: journal.then_some(JournalConfig {
            size_bytes: 256 << 10,
            two_flush: false,
            log_data: false,
            dedup,
        }),
        ..CreateOptions::default()
    };
    let shared: Arc<dyn Storage> = storage.clone();
    Image::create_shared(shared.clone(), &opts).expect("creating the in-memory image");
    let before = storage.to_bytes();
    let opts = if read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    };
    let image = Image::open(shared, &opts).expect("opening it");
    (storage, image, before)
}

/// A well-formed fixed-newstyle handshake that ends in `NBD_OPT_GO`.
fn handshake(structured: bool) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES).to_be_bytes());
    let mut option = |option: u32, data: &[u8]| {
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
    };
    if structured {
        option(proto::OPT_STRUCTURED_REPLY, &[]);
        let mut meta = Vec::new();
        meta.extend_from_slice(&0u32.to_be_bytes());
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&(proto::BASE_ALLOCATION.len() as u32).to_be_bytes());
        meta.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
        option(proto::OPT_SET_META_CONTEXT, &meta);
    }
    // Name "" (the default export), no information requests.
    option(proto::OPT_GO, &[0, 0, 0, 0, 0, 0]);
    b
}

/// One request the fuzzer chose, with its payload when it is a write.
struct Sent {
    request: proto::Request,
    magic_ok: bool,
}

/// Reads requests from `data` and appends them to the client stream.
fn requests(mut data: &[u8], stream: &mut Vec<u8>) -> Vec<Sent> {
    let mut sent = Vec::new();
    while let Some((chunk, rest)) = data.split_first_chunk::<12>() {
        if sent.len() == REQUESTS_MAX {
            break;
        }
        data = rest;
        let command = u16::from(chunk[0] % 9);
        let flags = u16::from(chunk[1]) & if chunk[2] & 0x80 != 0 { 0xffff } else { 0x0f };
        let magic_ok = chunk[2] != 0xff;
        // Offsets and lengths in 512-byte units most of the time, so that
        // requests hit the disk; raw otherwise, to reach the edges.
        let raw = u32::from_le_bytes([chunk[3], chunk[4], chunk[5], chunk[6]]);
        let len = u32::from_le_bytes([chunk[7], chunk[8], chunk[9], chunk[10]]);
        let (offset, length) = if chunk[11] & 1 == 0 {
            (u64::from(raw % 1024) * 512, (len % 512) * 512)
        } else {
            (u64::from(raw), len)
        };
        let request = proto::Request {
            flags,
            command,
            handle: sent.len() as u64,
            offset,
            length,
        };
        let mut header = request.encode();
        if !magic_ok {
            header[0] ^= 0xff;
        }
        stream.extend_from_slice(&header);
        sent.push(Sent { request, magic_ok });
        if command == proto::CMD_WRITE {
            if length > PAYLOAD_BYTES_MAX {
                // The payload is not sent: the stream ends inside it, and
                // nothing after it could be told from payload bytes.
                break;
            }
            let seed = chunk[11];
            stream.extend((0..length).map(|i| seed ^ (i as u8) ^ ((i >> 9) as u8)));
        }
    }
    sent
}

/// The server's bytes after the handshake: skips option replies up to the
/// acknowledgement of `NBD_OPT_GO`.
fn transmission_replies(out: &[u8]) -> &[u8] {
    let mut at = 18;
    while let Some(reply) = out.get(at..at + 20) {
        let option = u32::from_be_bytes(reply[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(reply[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(reply[16..20].try_into().unwrap()) as usize;
        at += 20 + len;
        if option == proto::OPT_GO && kind == proto::REP_ACK {
            return out.get(at..).unwrap_or(&[]);
        }
    }
    panic!("the server did not accept a well-formed NBD_OPT_GO");
}

/// What the disk must hold: `None` where a trim left it undefined.
struct Shadow(Vec<Option<u8>>);

impl Shadow {
    fn agrees(&self, offset: u64, bytes: &[u8]) -> bool {
        let known = &self.0[offset as usize..offset as usize + bytes.len()];
        known
            .iter()
            .zip(bytes)
            .all(|(k, b)| k.is_none_or(|k| k == *b))
    }
}

/// Walks simple replies against the requests sent, keeping the shadow.
fn follow_simple_replies(replies: &[u8], sent: &[Sent], stream: &[u8], shadow: &mut Shadow) {
    let mut at = 0;
    let mut payloads = stream_payloads(stream, sent);
    for s in sent {
        let payload = payloads.next().flatten();
        let req = &s.request;
        if !s.magic_ok || req.command == proto::CMD_DISC {
            // The server closes: no reply, and nothing after is read.
            break;
        }
        let Some(reply) = replies.get(at..at + 16) else {
            break;
        };
        at += 16;
        let magic = u32::from_be_bytes(reply[0..4].try_into().unwrap());
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(reply[8..16].try_into().unwrap());
        assert_eq!(
            magic,
            proto::SIMPLE_REPLY_MAGIC,
            "reply {} magic",
            req.handle
        );
        assert_eq!(handle, req.handle, "replies out of order");
        if error != 0 {
            continue;
        }
        let (start, end) = (
            req.offset as usize,
            req.offset as usize + req.length as usize,
        );
        assert!(
            req.command == proto::CMD_FLUSH || end as u64 <= DISK_BYTES,
            "request {} past the end succeeded",
            req.handle
        );
        match req.command {
            proto::CMD_READ => {
                let data = replies
                    .get(at..at + req.length as usize)
                    .expect("a successful read's data is sent whole");
                at += req.length as usize;
                assert!(
                    shadow.agrees(req.offset, data),
                    "read {} at {} returned bytes no write left there",
                    req.handle,
                    req.offset
                );
            }
            proto::CMD_WRITE => {
                let payload = payload.expect("a successful write had its payload");
                for (k, b) in shadow.0[start..end].iter_mut().zip(payload) {
                    *k = Some(*b);
                }
            }
            proto::CMD_WRITE_ZEROES => shadow.0[start..end].fill(Some(0)),
            proto::CMD_TRIM => shadow.0[start..end].fill(None),
            proto::CMD_FLUSH => {}
            other => panic!("command {other} succeeded"),
        }
    }
}

/// Each request's write payload, as it sits in the stream.
fn stream_payloads<'a>(
    stream: &'a [u8],
    sent: &'a [Sent],
) -> impl Iterator<Item = Option<&'a [u8]>> + 'a {
    let mut at = 0;
    sent.iter().map(move |s| {
        at += proto::REQUEST_BYTES;
        let req = &s.request;
        if req.command == proto::CMD_WRITE && req.length <= PAYLOAD_BYTES_MAX {
            let payload = stream.get(at..at + req.length as usize);
            at += req.length as usize;
            payload
        } else {
            None
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let setup = Setup {
        journal: mode & 1 != 0,
        read_only: mode & 2 != 0,
        handshake_fuzzed: mode & 4 != 0,
        structured: mode & 8 != 0,
        dedup: mode & 1 != 0 && mode & 16 != 0,
    };
    let (storage, image, before) = image(setup.journal, setup.dedup, setup.read_only);
    let image = Arc::new(image);
    let export = Export {
        name: String::new(),
        image: image.clone(),
        read_only: setup.read_only,
        writethrough: mode & 16 != 0,
        connections: Default::default(),
    };

    let (stream, sent) = if setup.handshake_fuzzed {
        (rest.to_vec(), Vec::new())
    } else {
        let mut stream = handshake(setup.structured);
        let sent = requests(rest, &mut stream);
        (stream, sent)
    };
    let mut out = Vec::new();
    let _ = serve_connection(&mut Cursor::new(&stream), &mut out, &export, &|| false);
    assert!(
        out.len() >= 18 && out[0..8] == proto::NBD_MAGIC.to_be_bytes(),
        "the server did not start with its greeting"
    );

    // The replies are followed where they are simple; elsewhere (a
    // fuzzed handshake, structured replies) no shadow is kept.
    let shadow = (!setup.handshake_fuzzed && !setup.structured).then(|| {
        let mut shadow = Shadow(vec![Some(0); DISK_BYTES as usize]);
        let handshake_len = handshake(false).len();
        let replies = transmission_replies(&out);
        follow_simple_replies(replies, &sent, &stream[handshake_len..], &mut shadow);
        shadow
    });
    drop(export);
    let image = Arc::into_inner(image).expect("the server let go of the image");
    let mut disk = vec![0u8; DISK_BYTES as usize];
    image.read(&mut disk, 0).expect("reading the disk back");
    assert!(
        shadow.is_none_or(|s| s.agrees(0, &disk)),
        "the disk differs from what the replies acknowledged"
    );
    image.close().expect("closing the image");

    if setup.read_only {
        assert!(
            storage.to_bytes() == before,
            "a read-only export changed the image"
        );
    }
    let report = check(&*storage, RepairMode::None, &[]).expect("checking the image");
    assert!(
        report.corruptions == 0 && report.leaks == 0 && report.check_errors == 0,
        "the session left the image inconsistent: {report:?}"
    );
});
