//! `qj serve [-k SOCKET | -b ADDR [-p PORT]] [-x NAME] [-r] [-t] [-e N]
//! [--cache writeback|writethrough] IMAGE`:
//! the image as an NBD export, shaped like qemu-nbd, so that fio, QEMU,
//! the libnbd tools and guests can drive the engine.

use std::path::PathBuf;
use std::sync::Arc;

use qj_engine::{CacheMode, Image, OpenOptions};

use crate::error::{engine, quoted, CliError, CliResult};
use crate::listener::{self as server, Address, Config, SHARED_MAX};
use crate::nbd::Export;

/// The NBD port (IANA), as qemu-nbd uses when only an address is given.
const NBD_PORT: u16 = 10809;

/// Arguments of `qj serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Listen on this Unix socket (the default is IMAGE.sock next to the image).
    #[arg(short = 'k', long = "socket", value_name = "SOCKET", conflicts_with_all = ["bind", "port"])]
    socket: Option<PathBuf>,
    /// Listen on TCP at this address instead of a Unix socket.
    #[arg(short = 'b', long = "bind", value_name = "ADDR")]
    bind: Option<String>,
    /// TCP port (with -b; 10809 when left out).
    #[arg(short = 'p', long = "port", value_name = "PORT", requires = "bind")]
    port: Option<u16>,
    /// Export name clients ask for (default: the empty name).
    #[arg(
        short = 'x',
        long = "export-name",
        value_name = "NAME",
        default_value = ""
    )]
    export_name: String,
    /// Export read-only: writes, trims and zeroing fail with EPERM.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Keep serving after the last client disconnects (fio's first
    /// connection is a probe that it drops).
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Clients served at once (others wait to be accepted); 1 as in qemu-nbd.
    /// fio with numjobs=N needs N.
    #[arg(short = 'e', long = "shared", value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=SHARED_MAX as i64))]
    shared: u16,
    /// Cache mode, as QEMU names it: writeback (a write is durable after
    /// the next FLUSH or with FUA), writethrough (every write is durable
    /// before its reply), none (O_DIRECT, durable at FLUSH or FUA) or
    /// directsync (O_DIRECT and writethrough). With O_DIRECT the file grows
    /// in steps of zeros (up to 8 MiB past what is written), given back at
    /// a clean stop.
    #[arg(long = "cache", value_name = "MODE", default_value = "writeback", value_parser = parse_cache)]
    cache: CacheMode,
    /// Image format (only qcow2; accepted for qemu-nbd compatibility).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Record every write, flush and length change reaching the image file
    /// in this dm-log-writes log (created or truncated), with a MARK entry
    /// at each journal commit; replay it with `qj crash replay` on a copy
    /// of the image as it was before serving.
    #[arg(long = "log-writes", value_name = "LOG")]
    log_writes: Option<PathBuf>,
    /// The image.
    image: PathBuf,
}

/// A cache mode by QEMU's name.
pub fn parse_cache(s: &str) -> Result<CacheMode, String> {
    CacheMode::parse(s).ok_or_else(|| {
        format!("unknown cache mode '{s}' (writeback, writethrough, none or directsync)")
    })
}

fn address(args: &ServeArgs) -> Address {
    match (&args.socket, &args.bind) {
        (Some(path), _) => Address::Unix(path.clone()),
        (None, Some(host)) => Address::Tcp(host.clone(), args.port.unwrap_or(NBD_PORT)),
        (None, None) => {
            let mut path = args.image.clone().into_os_string();
            path.push(".sock");
            Address::Unix(path.into())
        }
    }
}

/// Runs `qj serve` until a signal or (without -t) the last client leaves.
pub fn run(args: ServeArgs) -> CliResult<u8> {
    crate::cmd::require_qcow2(args.format.as_deref(), "serve")?;
    if args.export_name.len() > crate::nbd::proto::STRING_BYTES_MAX {
        return Err(CliError::Usage(format!(
            "serve: the export name is longer than {} bytes",
            crate::nbd::proto::STRING_BYTES_MAX
        )));
    }
    let mut opts = if args.read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    };
    opts.log_writes = args.log_writes.clone();
    opts.cache = args.cache;
    // No client's flush waits for a checkpoint (`checkpointer.rs`).
    opts.background_checkpoint = true;
    let image = Image::open_path(&args.image, &opts)
        .map_err(engine(format!("opening {}", quoted(&args.image))))?;
    let export = Export {
        name: args.export_name.clone(),
        image: Arc::new(image),
        read_only: args.read_only,
        writethrough: args.cache.writethrough(),
        connections: Default::default(),
    };
    let config = Config {
        address: address(&args),
        persistent: args.persistent,
        shared_max: usize::from(args.shared),
    };
    server::run(export, &config)?;
    Ok(0)
}
