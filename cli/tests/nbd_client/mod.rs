//! A small NBD client for the tests (fixed newstyle, NBD_OPT_GO, simple
//! replies, one request at a time), written from the protocol document
//! independently of the server, so that a test knows exactly which writes
//! the server acknowledged.

#![allow(dead_code)] // each test file uses a part

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
/// Command flag: the reply waits until the write is durable.
pub const FLAG_FUA: u16 = 1;
/// Most option replies to one GO before the client gives up.
const GO_REPLIES_MAX: usize = 16;

/// One connection in the transmission phase.
pub struct Client {
    stream: UnixStream,
    /// Export size in bytes.
    pub size: u64,
    next_handle: u64,
}

fn protocol(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl Client {
    /// Connects to the default export ("") on a Unix socket.
    pub fn connect(socket: &Path) -> io::Result<Client> {
        let mut s = UnixStream::connect(socket)?;
        if read_u64(&mut s)? != NBD_MAGIC || read_u64(&mut s)? != IHAVEOPT {
            return Err(protocol("bad greeting"));
        }
        let _handshake_flags = read_u16(&mut s)?;
        // Fixed newstyle, no zeroes.
        s.write_all(&3u32.to_be_bytes())?;
        // NBD_OPT_GO for "" with no information requests.
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&6u32.to_be_bytes());
        opt.extend_from_slice(&0u32.to_be_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let mut size = None;
        for _ in 0..GO_REPLIES_MAX {
            if read_u64(&mut s)? != OPTION_REPLY_MAGIC {
                return Err(protocol("bad option reply magic"));
            }
            let (_opt, kind, len) = (read_u32(&mut s)?, read_u32(&mut s)?, read_u32(&mut s)?);
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data)?;
            match kind {
                REP_INFO if data.len() == 12 && data[0..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
                REP_INFO => {}
                REP_ACK => {
                    let size = size.ok_or_else(|| protocol("no NBD_INFO_EXPORT"))?;
                    return Ok(Client {
                        stream: s,
                        size,
                        next_handle: 1,
                    });
                }
                other => return Err(protocol(format!("GO refused: reply type {other:#x}"))),
            }
        }
        Err(protocol("too many replies to NBD_OPT_GO"))
    }

    fn request(&mut self, command: u16, flags: u16, offset: u64, length: u32) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&command.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        self.stream.write_all(&b)?;
        Ok(handle)
    }

    /// Waits for the simple reply to `handle`; an NBD error becomes an
    /// `io::Error` naming it.
    fn reply(&mut self, handle: u64) -> io::Result<()> {
        if read_u32(&mut self.stream)? != SIMPLE_REPLY_MAGIC {
            return Err(protocol("bad reply magic"));
        }
        let error = read_u32(&mut self.stream)?;
        if read_u64(&mut self.stream)? != handle {
            return Err(protocol("reply to another handle"));
        }
        if error != 0 {
            return Err(io::Error::other(format!("NBD error {error}")));
        }
        Ok(())
    }

    /// Writes `data` at `offset`; `Ok` is the server's acknowledgement.
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> io::Result<()> {
        let handle = self.request(CMD_WRITE, flags, offset, data.len() as u32)?;
        self.stream.write_all(data)?;
        self.reply(handle)
    }

    /// Flushes; `Ok` means every acknowledged write is durable.
    pub fn flush(&mut self) -> io::Result<()> {
        let handle = self.request(CMD_FLUSH, 0, 0, 0)?;
        self.reply(handle)
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let handle = self.request(CMD_READ, 0, offset, len)?;
        self.reply(handle)?;
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data)?;
        Ok(data)
    }

    /// Sends NBD_CMD_DISC.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.request(CMD_DISC, 0, 0, 0).map(|_| ())
    }
}
