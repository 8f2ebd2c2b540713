//! The server fed scripted and random client bytes, on an in-memory image:
//! every malformed input gets the reply the protocol names or a closed
//! connection, never a panic, and nothing from a broken request is stored.

use std::io::Cursor;
use std::sync::Arc;

use proptest::prelude::*;
use qj_engine::{create_in_memory, CreateOptions};

use super::proto::{self, Request};
use super::{serve_connection, Ended, Export};

const SIZE: u64 = 1 << 20;

fn export(read_only: bool) -> Export {
    let image = create_in_memory(&CreateOptions {
        virtual_size: SIZE,
        ..CreateOptions::default()
    })
    .unwrap();
    Export {
        name: "vda".into(),
        image: Arc::new(image),
        read_only,
        writethrough: false,
        connections: Default::default(),
    }
}

/// Client bytes, built message by message.
#[derive(Default)]
struct Script(Vec<u8>);

impl Script {
    fn flags(mut self, f: u32) -> Self {
        self.0.extend_from_slice(&f.to_be_bytes());
        self
    }

    fn option(mut self, option: u32, data: &[u8]) -> Self {
        self.0.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        self.0.extend_from_slice(&option.to_be_bytes());
        self.0.extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.0.extend_from_slice(data);
        self
    }

    fn go(self, name: &str, infos: &[u16]) -> Self {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        self.option(proto::OPT_GO, &d)
    }

    fn set_meta(self, name: &str, queries: &[&str]) -> Self {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.option(proto::OPT_SET_META_CONTEXT, &d)
    }

    /// The usual modern handshake: structured replies, base:allocation, GO
    /// asking for block sizes.
    fn modern(self) -> Self {
        self.flags(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES)
            .option(proto::OPT_STRUCTURED_REPLY, &[])
            .set_meta("vda", &[proto::BASE_ALLOCATION])
            .go("vda", &[proto::INFO_BLOCK_SIZE])
    }

    /// Simple replies, no block sizes asked (so no alignment promised).
    fn plain(self) -> Self {
        self.flags(proto::CLIENT_FIXED_NEWSTYLE).go("vda", &[])
    }

    fn request(mut self, command: u16, flags: u16, handle: u64, offset: u64, length: u32) -> Self {
        let r = Request {
            flags,
            command,
            handle,
            offset,
            length,
        };
        self.0.extend_from_slice(&r.encode());
        self
    }

    fn payload(mut self, data: &[u8]) -> Self {
        self.0.extend_from_slice(data);
        self
    }

    fn run(&self, export: &Export) -> (std::io::Result<Ended>, Vec<u8>) {
        let mut r = Cursor::new(self.0.clone());
        let mut w = Vec::new();
        let result = serve_connection(&mut r, &mut w, export, &|| false);
        (result, w)
    }
}

/// Reads the server's bytes message by message.
struct Replies<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Replies<'a> {
    fn new(b: &'a [u8]) -> Self {
        assert_eq!(&b[0..8], &proto::NBD_MAGIC.to_be_bytes());
        Replies { b, at: 18 }
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let out = &self.b[self.at..self.at + n];
        self.at += n;
        out
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take(2).try_into().unwrap())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take(8).try_into().unwrap())
    }

    /// One option reply: (option, type, data).
    fn option(&mut self) -> (u32, u32, &'a [u8]) {
        assert_eq!(self.u64(), proto::OPTION_REPLY_MAGIC);
        let (opt, kind, len) = (self.u32(), self.u32(), self.u32());
        (opt, kind, self.take(len as usize))
    }

    /// Option replies up to and including the final ACK or error.
    fn options_until_final(&mut self) -> Vec<(u32, u32, &'a [u8])> {
        let mut out = Vec::new();
        loop {
            let r = self.option();
            let last = r.1 == proto::REP_ACK || r.1 & (1 << 31) != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// A simple reply: (error, handle).
    fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), proto::SIMPLE_REPLY_MAGIC);
        (self.u32(), self.u64())
    }

    /// A structured chunk: (flags, type, handle, payload).
    fn chunk(&mut self) -> (u16, u16, u64, &'a [u8]) {
        assert_eq!(self.u32(), proto::STRUCTURED_REPLY_MAGIC);
        let (flags, kind, handle, len) = (self.u16(), self.u16(), self.u64(), self.u32());
        (flags, kind, handle, self.take(len as usize))
    }

    /// An error, whichever reply form carries it.
    fn error(&mut self) -> (u32, u64) {
        let magic = u32::from_be_bytes(self.b[self.at..self.at + 4].try_into().unwrap());
        if magic == proto::SIMPLE_REPLY_MAGIC {
            return self.simple();
        }
        let (flags, kind, handle, payload) = self.chunk();
        assert_eq!(
            (flags, kind),
            (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR)
        );
        (
            u32::from_be_bytes(payload[0..4].try_into().unwrap()),
            handle,
        )
    }

    fn done(&self) -> bool {
        self.at == self.b.len()
    }
}

fn skip_modern_handshake(r: &mut Replies) {
    for _ in 0..3 {
        r.options_until_final();
    }
}

#[test]
fn modern_client_writes_reads_and_sees_holes() {
    let e = export(false);
    let data = vec![0x5au8; 4096];
    let (result, out) = Script::default()
        .modern()
        .request(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 1, 65536, 4096)
        .payload(&data)
        .request(proto::CMD_READ, 0, 2, 65536, 4096)
        .request(proto::CMD_BLOCK_STATUS, 0, 3, 0, 196608)
        .request(proto::CMD_FLUSH, 0, 4, 0, 0)
        .request(proto::CMD_DISC, 0, 5, 0, 0)
        .run(&e);
    assert_eq!(
        result.unwrap(),
        Ended::InTransmission(super::transmission::End::Disconnect)
    );
    let mut r = Replies::new(&out);
    assert_eq!(r.options_until_final()[0].1, proto::REP_ACK);
    let meta = r.options_until_final();
    assert_eq!(meta[0].1, proto::REP_META_CONTEXT);
    assert_eq!(&meta[0].2[4..], proto::BASE_ALLOCATION.as_bytes());
    let go = r.options_until_final();
    let kinds: Vec<u32> = go.iter().map(|o| o.1).collect();
    assert_eq!(kinds, [proto::REP_INFO, proto::REP_INFO, proto::REP_ACK]);
    assert_eq!(
        &go[1].2[2..],
        &[0, 0, 2, 0, 0, 1, 0, 0, 2, 0, 0, 0],
        "block sizes 512 / 64 KiB / 32 MiB"
    );
    let flags = u16::from_be_bytes(go[0].2[10..12].try_into().unwrap());
    assert_ne!(flags & proto::TFLAG_CAN_MULTI_CONN, 0);
    assert_eq!(flags & proto::TFLAG_READ_ONLY, 0);
    assert_eq!(r.simple(), (0, 1));
    let (flags, kind, handle, payload) = r.chunk();
    assert_eq!(
        (flags, kind, handle),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, 2)
    );
    assert_eq!(&payload[0..8], &65536u64.to_be_bytes());
    assert_eq!(&payload[8..], &data[..]);
    let (_, kind, handle, payload) = r.chunk();
    assert_eq!((kind, handle), (proto::REPLY_TYPE_BLOCK_STATUS, 3));
    let words: Vec<u32> = payload
        .chunks(4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
        .collect();
    // Context 1: a hole, the written cluster, a hole.
    assert_eq!(words, [1, 65536, 3, 65536, 0, 65536, 3]);
    assert_eq!(r.simple(), (0, 4));
    assert!(r.done(), "nothing after DISC");
}

#[test]
fn bad_requests_get_the_protocol_errors_and_the_connection_goes_on() {
    let e = export(false);
    let (result, out) = Script::default()
        .modern()
        // Past the end: a write is ENOSPC (its payload is consumed), a
        // read EINVAL.
        .request(proto::CMD_WRITE, 0, 1, SIZE - 512, 1024)
        .payload(&[7u8; 1024])
        .request(proto::CMD_READ, 0, 2, SIZE, 512)
        // Unaligned, after promising 512-byte blocks.
        .request(proto::CMD_READ, 0, 3, 100, 512)
        .request(proto::CMD_WRITE, 0, 4, 0, 100)
        .payload(&[7u8; 100])
        // Unknown command, flag not valid for the command, read over the
        // maximum, an offset that overflows, flush with a length.
        .request(99, 0, 5, 0, 0)
        .request(proto::CMD_TRIM, proto::CMD_FLAG_NO_HOLE, 6, 0, 512)
        .request(proto::CMD_READ, 0, 7, 0, (32 << 20) + 512)
        .request(proto::CMD_READ, 0, 8, u64::MAX - 100, 512)
        .request(proto::CMD_FLUSH, 0, 9, 0, 512)
        .request(proto::CMD_BLOCK_STATUS, 0, 10, 0, 0)
        // Still serving: a good write and read.
        .request(proto::CMD_WRITE, 0, 11, 0, 512)
        .payload(&[9u8; 512])
        .request(proto::CMD_READ, 0, 12, 0, 512)
        .run(&e);
    assert_eq!(
        result.unwrap(),
        Ended::InTransmission(super::transmission::End::Closed)
    );
    let mut r = Replies::new(&out);
    skip_modern_handshake(&mut r);
    let want = [
        (proto::ENOSPC, 1),
        (proto::EINVAL, 2),
        (proto::EINVAL, 3),
        (proto::EINVAL, 4),
        (proto::EINVAL, 5),
        (proto::EINVAL, 6),
        (proto::EINVAL, 7),
        (proto::EINVAL, 8),
        (proto::EINVAL, 9),
        (proto::EINVAL, 10),
    ];
    for w in want {
        assert_eq!(r.error(), w);
    }
    assert_eq!(r.simple(), (0, 11));
    let (_, _, handle, payload) = r.chunk();
    assert_eq!((handle, &payload[8..]), (12, &[9u8; 512][..]));
    // Nothing of the refused writes reached the image.
    let mut tail = vec![1u8; 512];
    e.image.read(&mut tail, SIZE - 512).unwrap();
    assert_eq!(tail, vec![0u8; 512]);
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let e = export(true);
    let (_, out) = Script::default()
        .plain()
        .request(proto::CMD_WRITE, 0, 1, 0, 512)
        .payload(&[1u8; 512])
        .request(proto::CMD_TRIM, 0, 2, 0, 512)
        .request(proto::CMD_WRITE_ZEROES, 0, 3, 0, 512)
        .request(proto::CMD_FLUSH, 0, 4, 0, 0)
        .run(&e);
    let mut r = Replies::new(&out);
    let go = r.options_until_final();
    let flags = u16::from_be_bytes(go[0].2[10..12].try_into().unwrap());
    assert_ne!(flags & proto::TFLAG_READ_ONLY, 0);
    assert_eq!(flags & proto::TFLAG_SEND_TRIM, 0);
    assert_eq!(r.simple(), (proto::EPERM, 1));
    assert_eq!(r.simple(), (proto::EPERM, 2));
    assert_eq!(r.simple(), (proto::EPERM, 3));
    assert_eq!(r.simple(), (0, 4));
}

#[test]
fn unaligned_requests_are_served_when_no_alignment_was_promised() {
    let e = export(false);
    let (_, out) = Script::default()
        .plain()
        .request(proto::CMD_WRITE, 0, 1, 3, 5)
        .payload(b"hello")
        .request(proto::CMD_READ, 0, 2, 3, 5)
        .request(proto::CMD_BLOCK_STATUS, 0, 3, 0, 512)
        .run(&e);
    let mut r = Replies::new(&out);
    let go = r.options_until_final();
    assert_eq!(&go[1].2[2..6], &1u32.to_be_bytes(), "minimum block 1");
    assert_eq!(r.simple(), (0, 1));
    assert_eq!(r.simple(), (0, 2));
    assert_eq!(r.take(5), b"hello");
    // No context selected: block status is refused.
    assert_eq!(r.simple(), (proto::EINVAL, 3));
}

#[test]
fn write_zeroes_with_and_without_no_hole() {
    let e = export(false);
    e.image.write(&[1u8; 131072], 0).unwrap();
    let (_, out) = Script::default()
        .modern()
        .request(
            proto::CMD_WRITE_ZEROES,
            proto::CMD_FLAG_NO_HOLE,
            1,
            0,
            65536,
        )
        .request(
            proto::CMD_WRITE_ZEROES,
            proto::CMD_FLAG_FUA,
            2,
            65536,
            65536,
        )
        .request(proto::CMD_TRIM, 0, 3, 65536, 65536)
        .run(&e);
    let mut r = Replies::new(&out);
    skip_modern_handshake(&mut r);
    assert_eq!(r.simple(), (0, 1));
    assert_eq!(r.simple(), (0, 2));
    assert_eq!(r.simple(), (0, 3));
    let map = e.image.map().unwrap();
    assert!(map[0].data && map[0].start == 0 && map[0].length == 65536);
    assert!(!map[1].data && map[1].zero);
    let mut back = vec![1u8; 131072];
    e.image.read(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn writes_flush_before_the_reply_with_fua_or_writethrough() {
    // (writethrough, FUA flag) -> whether the write must be flushed.
    for (writethrough, flags, flushed) in [
        (false, 0, false),
        (false, proto::CMD_FLAG_FUA, true),
        (true, 0, true),
    ] {
        let mut e = export(false);
        e.writethrough = writethrough;
        let before = e.image.stats().flushes;
        let (_, out) = Script::default()
            .plain()
            .request(proto::CMD_WRITE, flags, 1, 0, 512)
            .payload(&[1u8; 512])
            .run(&e);
        let mut r = Replies::new(&out);
        r.options_until_final();
        assert_eq!(r.simple(), (0, 1));
        assert_eq!(
            e.image.stats().flushes > before,
            flushed,
            "writethrough {writethrough}, flags {flags}"
        );
    }
}

#[test]
fn oversized_write_is_refused_and_closes() {
    let e = export(false);
    let (result, out) = Script::default()
        .modern()
        .request(proto::CMD_WRITE, 0, 1, 0, (32 << 20) + 512)
        .payload(&[1u8; 4096])
        .run(&e);
    assert_eq!(result.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    let mut r = Replies::new(&out);
    skip_modern_handshake(&mut r);
    assert_eq!(r.error(), (proto::EINVAL, 1));
    assert!(r.done());
}

/// Found by the `nbd_server` fuzz target: a DISC with bogus flags got an
/// EINVAL reply and the connection went on, so the writes a client sent
/// after it (believing the connection closed) were stored.
#[test]
fn disc_with_bogus_flags_still_ends_the_connection_without_a_reply() {
    let e = export(false);
    let (result, out) = Script::default()
        .plain()
        .request(proto::CMD_DISC, proto::CMD_FLAG_FUA, 1, 4096, 512)
        .request(proto::CMD_WRITE, 0, 2, 0, 4096)
        .payload(&[9u8; 4096])
        .run(&e);
    assert_eq!(
        result.unwrap(),
        Ended::InTransmission(super::transmission::End::Disconnect)
    );
    let mut r = Replies::new(&out);
    r.options_until_final();
    assert!(r.done(), "DISC got a reply");
    let mut back = vec![1u8; 4096];
    e.image.read(&mut back, 0).unwrap();
    assert_eq!(back, vec![0u8; 4096], "a write after DISC was stored");
}

#[test]
fn client_gone_mid_payload_writes_nothing() {
    let e = export(false);
    let (result, _) = Script::default()
        .modern()
        .request(proto::CMD_WRITE, 0, 1, 0, 4096)
        .payload(&[3u8; 1000])
        .run(&e);
    assert_eq!(
        result.unwrap_err().kind(),
        std::io::ErrorKind::UnexpectedEof
    );
    let mut back = vec![1u8; 4096];
    e.image.read(&mut back, 0).unwrap();
    assert_eq!(back, vec![0u8; 4096]);
    assert!(!e.image.map().unwrap()[0].data);
}

#[test]
fn handshake_errors_and_unknown_options() {
    let e = export(false);
    let mut go_bad = Vec::new();
    go_bad.extend_from_slice(&100u32.to_be_bytes());
    let (result, out) = Script::default()
        .flags(proto::CLIENT_FIXED_NEWSTYLE)
        .option(5, &[]) // STARTTLS: unsupported
        .option(12, &[1, 2, 3]) // unknown, with data
        .option(proto::OPT_LIST, &[])
        .option(proto::OPT_LIST, &[1])
        .option(proto::OPT_GO, &go_bad)
        .go("nope", &[])
        .set_meta("vda", &[proto::BASE_ALLOCATION]) // before structured replies
        .option(proto::OPT_ABORT, &[])
        .run(&e);
    assert_eq!(result.unwrap(), Ended::InHandshake);
    let mut r = Replies::new(&out);
    assert_eq!(r.option().1, proto::REP_ERR_UNSUP);
    assert_eq!(r.option().1, proto::REP_ERR_UNSUP);
    let list = r.options_until_final();
    assert_eq!(list[0].1, proto::REP_SERVER);
    assert_eq!(list[0].2, &[0, 0, 0, 3, b'v', b'd', b'a']);
    assert_eq!(list[1].1, proto::REP_ACK);
    assert_eq!(r.option().1, proto::REP_ERR_INVALID);
    assert_eq!(r.option().1, proto::REP_ERR_INVALID);
    assert_eq!(r.option().1, proto::REP_ERR_UNKNOWN);
    assert_eq!(r.option().1, proto::REP_ERR_INVALID);
    assert_eq!(r.option().1, proto::REP_ACK);
    assert!(r.done());
}

#[test]
fn protocol_violations_close_the_connection() {
    let e = export(false);
    // Unknown client flags.
    let (result, _) = Script::default().flags(1 << 7).run(&e);
    assert_eq!(result.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    // Bad option magic.
    let (result, _) = Script::default().flags(1).payload(&[0u8; 16]).run(&e);
    assert_eq!(result.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    // EXPORT_NAME for an unknown export cannot be answered with an error.
    let (result, _) = Script::default()
        .flags(1)
        .option(proto::OPT_EXPORT_NAME, b"nope")
        .run(&e);
    assert_eq!(result.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    // Option data over the limit.
    let mut s = Script::default().flags(1);
    s.0.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    s.0.extend_from_slice(&proto::OPT_LIST.to_be_bytes());
    s.0.extend_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(
        s.run(&e).0.unwrap_err().kind(),
        std::io::ErrorKind::InvalidData
    );
    // Bad request magic.
    let (result, _) = Script::default().plain().payload(&[0u8; 28]).run(&e);
    assert_eq!(result.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
}

#[test]
fn export_name_enters_transmission() {
    let e = export(false);
    let (result, out) = Script::default()
        .flags(proto::CLIENT_FIXED_NEWSTYLE)
        .option(proto::OPT_EXPORT_NAME, b"vda")
        .request(proto::CMD_READ, 0, 1, 0, 512)
        .run(&e);
    result.unwrap();
    let mut r = Replies::new(&out);
    assert_eq!(r.u64(), SIZE);
    let _flags = r.u16();
    assert_eq!(r.take(124), &[0u8; 124][..]);
    assert_eq!(r.simple(), (0, 1));
    assert_eq!(r.take(512), &[0u8; 512][..]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random bytes into the handshake: an answer or a closed connection.
    #[test]
    fn random_handshake_bytes_never_panic(
        flags in any::<u32>(),
        body in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let e = export(false);
        let mut s = Script::default().flags(flags & 3);
        s.0.extend_from_slice(&body);
        let _ = s.run(&e);
        let mut s = Script::default().flags(flags);
        s.0.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        s.0.extend_from_slice(&body);
        let _ = s.run(&e);
    }

    /// Random requests (valid magic, random fields, random payload bytes)
    /// after a good handshake: the server answers or closes, and the image
    /// is still usable afterwards.
    #[test]
    fn random_requests_never_panic(
        modern: bool,
        requests in proptest::collection::vec(
            (0u16..10, any::<u16>(), any::<u64>(), 0u64..(SIZE + 4096), 0u32..70000),
            1..8,
        ),
        noise in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let e = export(false);
        let mut s = if modern { Script::default().modern() } else { Script::default().plain() };
        for (command, flags, handle, offset, length) in requests {
            s = s.request(command, flags & 0x3f, handle, offset, length);
            if command == proto::CMD_WRITE {
                s.0.extend(std::iter::repeat_n(0xa5u8, length.min(70000) as usize));
            }
        }
        s.0.extend_from_slice(&noise);
        let _ = s.run(&e);
        let mut buf = vec![0u8; 4096];
        prop_assert!(e.image.read(&mut buf, 0).is_ok());
        prop_assert!(e.image.flush().is_ok());
    }
}

/// A client that sends one message at a time: between messages nothing
/// more has arrived (`has_buffered` is false), as with a client waiting
/// for each reply. `seen` gets the image's flush count as each message
/// starts to arrive, `reads` as each read of the server starts (message,
/// offset in it, flushes).
struct OneAtATime {
    messages: Vec<Vec<u8>>,
    next: usize,
    at: usize,
    image: Arc<qj_engine::Image>,
    seen: Vec<u64>,
    reads: Vec<(usize, usize, u64)>,
}

impl OneAtATime {
    fn new(messages: Vec<Vec<u8>>, image: Arc<qj_engine::Image>) -> Self {
        Self {
            messages,
            next: 0,
            at: 0,
            image,
            seen: Vec::new(),
            reads: Vec::new(),
        }
    }
}

impl std::io::Read for OneAtATime {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(message) = self.messages.get(self.next) else {
            return Ok(0);
        };
        let flushes = self.image.stats().flushes;
        if self.at == 0 {
            self.seen.push(flushes);
        }
        self.reads.push((self.next, self.at, flushes));
        let n = buf.len().min(message.len() - self.at);
        buf[..n].copy_from_slice(&message[self.at..self.at + n]);
        self.at += n;
        if self.at == message.len() {
            self.next += 1;
            self.at = 0;
        }
        Ok(n)
    }
}

impl super::ClientStream for OneAtATime {
    fn has_buffered(&self) -> bool {
        self.at > 0
    }
}

/// The handshake, then each request as its own message: `W` a 4 KiB write
/// (at its own cluster), `F` a flush; `+` sends the next request in the
/// same message (it has arrived when the one before is served).
fn one_at_a_time(e: &Export, requests: &str) -> (OneAtATime, Vec<u8>) {
    let mut messages = vec![Script::default().plain().0];
    let mut joined = false;
    let mut count = 0u64;
    for c in requests.chars() {
        if c == '+' {
            joined = true;
            continue;
        }
        count += 1;
        let script = match c {
            'W' => Script::default()
                .request(proto::CMD_WRITE, 0, count, count * 65536, 4096)
                .payload(&[c as u8; 4096]),
            'F' => Script::default().request(proto::CMD_FLUSH, 0, count, 0, 0),
            other => panic!("unknown request {other}"),
        };
        match messages.last_mut() {
            Some(last) if joined => last.extend_from_slice(&script.0),
            _ => messages.push(script.0),
        }
        joined = false;
    }
    let mut r = OneAtATime::new(messages, e.image.clone());
    let mut w = Vec::new();
    serve_connection(&mut r, &mut w, e, &|| false).unwrap();
    let mut replies = Replies::new(&w);
    replies.options_until_final();
    for handle in 1..=count {
        assert_eq!(replies.simple(), (0, handle), "request {handle}");
    }
    (r, w)
}

#[test]
fn a_client_that_flushes_after_each_write_finds_the_next_write_flushed_before_its_flush_arrives() {
    let e = export(false);
    let (r, _) = one_at_a_time(&e, "WFWFW");
    // seen[k]: flushes as message k arrives (0 is the handshake).
    let s = &r.seen;
    assert_eq!(
        s[2], s[1],
        "the first write is not flushed ahead: no pattern yet"
    );
    assert!(s[3] > s[2], "the first FLUSH flushes");
    assert!(
        s[4] > s[3],
        "the second write is flushed before its FLUSH arrives"
    );
    assert_eq!(
        s[5], s[4],
        "that FLUSH finds it durable and flushes nothing"
    );
}

#[test]
fn a_write_not_followed_by_a_flush_ends_the_flushing_ahead() {
    let e = export(false);
    let (r, _) = one_at_a_time(&e, "WFWWWF");
    let s = &r.seen;
    assert!(s[4] > s[3], "the second write is flushed ahead (the guess)");
    assert_eq!(
        s[5], s[4],
        "a write followed it, not a FLUSH: no more guesses"
    );
    assert_eq!(s[6], s[5], "nor after the next write");
}

#[test]
fn no_connection_flushes_ahead_beside_another() {
    let e = export(false);
    e.connections.store(2, std::sync::atomic::Ordering::Relaxed);
    let (r, _) = one_at_a_time(&e, "WFWFW");
    let s = &r.seen;
    assert_eq!(
        s[4], s[3],
        "beside another connection, no write is flushed ahead"
    );
    assert!(s[5] > s[4], "each FLUSH flushes");
}

#[test]
fn no_flush_ahead_when_the_next_request_has_arrived() {
    let e = export(false);
    let (r, _) = one_at_a_time(&e, "WFW+FW");
    // Message 3 holds the second write and its FLUSH: the server reads
    // the write's header (offset 0), its payload (28), then the FLUSH's
    // header (28 + 4096), and nothing may flush between the last two.
    let at = |offset: usize| {
        r.reads
            .iter()
            .find(|&&(message, at, _)| message == 3 && at == offset)
            .map(|&(_, _, flushes)| flushes)
            .unwrap()
    };
    assert_eq!(at(28 + 4096), at(28), "the FLUSH was already here");
    assert!(r.seen[4] > r.seen[3], "the FLUSH flushes itself");
}
