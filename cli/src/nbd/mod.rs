//! An NBD server for one image (`qj serve`): the protocol as pure code
//! (`proto`), the handshake, the transmission phase, block status from the
//! image's map. It reads and writes any byte stream, so tests and the
//! fuzzer drive it without sockets; the listener that accepts connections
//! is the binary's (`listener.rs`).

pub mod extents;
pub mod handshake;
pub mod transmission;

/// The wire format lives in `qj-spec` (pure code, fuzzed there).
pub use qj_spec::nbd as proto;

use std::io::{self, BufReader, Cursor, Read, Write};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use qj_engine::Image;

/// The one export a server offers.
#[derive(Debug, Clone)]
pub struct Export {
    /// The name clients ask for ("" is the default export).
    pub name: String,
    /// The image, shared by every connection.
    pub image: Arc<Image>,
    /// Writes, trims and zeroing are refused with EPERM.
    pub read_only: bool,
    /// Every write, trim and zeroing is durable before its reply (QEMU's
    /// `cache=writethrough`), as if each carried FUA.
    pub writethrough: bool,
    /// The connections open now (the listener counts them): a connection
    /// flushes ahead of its client's FLUSH only while it is the only one
    /// (`transmission.rs`, `FlushAhead`).
    pub connections: Arc<AtomicUsize>,
}

/// A client's byte stream that can tell whether more of it has arrived.
pub trait ClientStream: Read {
    /// Whether bytes already received wait to be read: reading would not
    /// block.
    fn has_buffered(&self) -> bool;
}

/// What the buffer holds only: a request still in the socket counts as
/// not arrived (a client with several requests in flight may then see a
/// flush ahead of one, which costs time, never safety).
impl<R: Read> ClientStream for BufReader<R> {
    fn has_buffered(&self) -> bool {
        !self.buffer().is_empty()
    }
}

/// A whole recorded stream (tests, the fuzzer): whatever is left has
/// arrived.
impl<T: AsRef<[u8]>> ClientStream for Cursor<T> {
    fn has_buffered(&self) -> bool {
        self.position() < self.get_ref().as_ref().len() as u64
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` when the stream ends
/// cleanly before the first byte (a client leaving between messages).
pub fn read_or_eof(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// How a connection ended, when it ended without a protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client left during the handshake.
    InHandshake,
    /// The client left during transmission.
    InTransmission(transmission::End),
}

/// Serves one connection from greeting to disconnect. `Err` means the
/// connection had to be closed: a protocol violation, or the client went
/// away in the middle of a message.
pub fn serve_connection(
    r: &mut impl ClientStream,
    w: &mut impl Write,
    export: &Export,
    shutting_down: &dyn Fn() -> bool,
) -> io::Result<Ended> {
    match handshake::negotiate(r, w, export, shutting_down)? {
        handshake::Outcome::Ended => Ok(Ended::InHandshake),
        handshake::Outcome::Transmission(n) => {
            let mut buf = Vec::new();
            transmission::serve(r, w, export, &n, &mut buf).map(Ended::InTransmission)
        }
    }
}

#[cfg(test)]
mod tests;
