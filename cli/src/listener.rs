//! The listener: accepts connections on a Unix socket or a TCP address,
//! serves each on its own thread (at most `shared_max` at once, like
//! qemu-nbd's `--shared`), and ends cleanly on SIGINT or SIGTERM: no new
//! connections, requests in flight finish, then the image is closed
//! (flush, journal checkpoint, clean header).

use std::collections::BTreeMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{io as io_err, quoted, CliError, CliResult};
use crate::nbd::{serve_connection, Export};

/// How often the accept loop looks for a stop request or a free slot
/// while no client is connecting.
const ACCEPT_POLL: Duration = Duration::from_millis(5);
/// Socket buffer sizes on our side: room for a few 64 KiB requests.
const STREAM_BUFFER_BYTES: usize = 256 << 10;
/// Most clients ever served at once, whatever `--shared` says.
pub const SHARED_MAX: usize = 1024;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP address and port.
    Tcp(String, u16),
}

impl Address {
    /// The URI clients connect to.
    #[must_use]
    pub fn uri(&self, export_name: &str) -> String {
        match self {
            Address::Unix(p) => format!("nbd+unix:///{export_name}?socket={}", p.display()),
            Address::Tcp(host, port) if host.contains(':') => {
                format!("nbd://[{host}]:{port}/{export_name}")
            }
            Address::Tcp(host, port) => format!("nbd://{host}:{port}/{export_name}"),
        }
    }
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub address: Address,
    /// Keep serving after the last client left (`-t`).
    pub persistent: bool,
    /// Most clients at once; others wait in the listen backlog.
    pub shared_max: usize,
}

/// One accepted connection.
#[derive(Debug)]
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.shutdown(how),
            Conn::Tcp(s) => s.shutdown(how),
        }
    }

    fn set_blocking(&self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_nonblocking(false),
            Conn::Tcp(s) => {
                // Replies are small and latency is what a synced workload
                // measures: no Nagle delay.
                s.set_nodelay(true)?;
                s.set_nonblocking(false)
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Conn::Tcp(s)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds a Unix socket. A socket file left by a server that died is
/// replaced; one that a live server answers on, or a file that is not a
/// socket, is refused.
fn bind_unix(path: &Path) -> CliResult<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(CliError::failed(
                format!("listening on {}", quoted(path)),
                "the path exists and is not a socket",
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(CliError::failed(
                format!("listening on {}", quoted(path)),
                "another server is listening on this socket",
            ));
        }
        std::fs::remove_file(path).map_err(io_err(format!(
            "removing the stale socket {}",
            quoted(path)
        )))?;
    }
    UnixListener::bind(path).map_err(io_err(format!("listening on {}", quoted(path))))
}

fn listen(address: &Address) -> CliResult<Listener> {
    let listener = match address {
        Address::Unix(path) => Listener::Unix(bind_unix(path)?, path.clone()),
        Address::Tcp(host, port) => Listener::Tcp(
            TcpListener::bind((host.as_str(), *port))
                .map_err(io_err(format!("listening on {host} port {port}")))?,
        ),
    };
    let r = match &listener {
        Listener::Unix(l, _) => l.set_nonblocking(true),
        Listener::Tcp(l) => l.set_nonblocking(true),
    };
    r.map_err(io_err("setting up the listening socket"))?;
    Ok(listener)
}

/// Whether an error only means the client went away.
fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// The connections being served, so that a shutdown can end them.
type Clients = Arc<Mutex<BTreeMap<u64, Conn>>>;

fn spawn_client(
    id: u64,
    conn: Conn,
    export: &Export,
    stop: &Arc<AtomicBool>,
    active: &Arc<AtomicUsize>,
    clients: &Clients,
) -> io::Result<JoinHandle<()>> {
    conn.set_blocking()?;
    let reader = conn.try_clone()?;
    clients
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, conn.try_clone()?);
    let (export, stop, thread_active, thread_clients) = (
        export.clone(),
        Arc::clone(stop),
        Arc::clone(active),
        Arc::clone(clients),
    );
    active.fetch_add(1, Ordering::SeqCst);
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-client-{id}"))
        .spawn(move || {
            let mut r = BufReader::with_capacity(STREAM_BUFFER_BYTES, reader);
            let mut w = BufWriter::with_capacity(STREAM_BUFFER_BYTES, conn);
            let shutting_down = || stop.load(Ordering::SeqCst);
            match serve_connection(&mut r, &mut w, &export, &shutting_down) {
                Ok(_) => {}
                Err(e) if is_disconnect(&e) => {
                    if !shutting_down() {
                        eprintln!("qj: serve: client {id} went away in the middle of a message");
                    }
                }
                Err(e) => {
                    eprintln!(
                        "{}",
                        crate::error::one_line(&format!(
                            "qj: serve: client {id}: connection closed: {e}"
                        ))
                    );
                }
            }
            let _ = w.flush();
            let _ = w.get_ref().shutdown(Shutdown::Both);
            thread_clients
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            thread_active.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        // The thread never ran: undo what it would have undone.
        clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        active.fetch_sub(1, Ordering::SeqCst);
    }
    spawned
}

/// Serves `export` until a signal, or until the last client left (without
/// `persistent`); then closes the image cleanly. Prints the URI on stdout
/// once the server accepts connections.
pub fn run(export: Export, config: &Config) -> CliResult<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while shutting down ends the process at once.
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))
            .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&stop)))
            .map_err(io_err("installing signal handlers"))?;
    }
    let listener = listen(&config.address)?;
    println!("serving on {}", config.address.uri(&export.name));
    let _ = io::stdout().flush();

    let active = Arc::clone(&export.connections);
    let clients: Clients = Arc::default();
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if !config.persistent && next_id > 0 && active.load(Ordering::SeqCst) == 0 {
            break;
        }
        // Threads that ended are joined as we go: the list stays bounded by
        // the clients connected at once.
        threads.retain(|t| !t.is_finished());
        if active.load(Ordering::SeqCst) >= config.shared_max {
            std::thread::sleep(ACCEPT_POLL);
            continue;
        }
        match listener.accept() {
            Ok(conn) => {
                next_id += 1;
                match spawn_client(next_id, conn, &export, &stop, &active, &clients) {
                    Ok(t) => threads.push(t),
                    Err(e) => eprintln!("qj: serve: cannot serve client {next_id}: {e}"),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors or a connection reset before accept:
                // the listener itself is fine, try again shortly.
                eprintln!("qj: serve: accepting a connection: {e}");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
    drop(listener);
    // Requests in flight finish and get their replies; reading the next
    // one sees the end of the stream.
    for conn in clients.lock().unwrap_or_else(|e| e.into_inner()).values() {
        let _ = conn.shutdown(Shutdown::Read);
    }
    for t in threads {
        let _ = t.join();
    }
    let Export { image, .. } = export;
    match Arc::try_unwrap(image) {
        Ok(image) => image
            .close()
            .map_err(crate::error::engine("closing the image")),
        Err(image) => image
            .flush()
            .map_err(crate::error::engine("flushing the image")),
    }
}
