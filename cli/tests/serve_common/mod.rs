//! What the `qj serve` tests share: running tools, images of both
//! backends, and a server process that is stopped cleanly (SIGTERM) or
//! killed.

#![allow(dead_code)] // each test file uses a part

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The two metadata backends, as `qj create` options.
pub const BACKENDS: [(&str, &[&str]); 2] =
    [("flush-ordering", &[]), ("journal", &["-o", "journal=on"])];

pub use crate::support::{ok, qj, run, text};

/// The `qj` binary under test.
pub fn qj_bin() -> &'static str {
    env!("CARGO_BIN_EXE_qj")
}

/// Creates a 64 MiB image with the backend's options.
pub fn create(dir: &Path, name: &str, backend_opts: &[&str]) -> PathBuf {
    let mut args = vec!["create"];
    args.extend_from_slice(backend_opts);
    args.extend_from_slice(&[name, "64M"]);
    ok(qj(dir, &args));
    dir.join(name)
}

/// `qj check` reports a clean image (no corruption, no leak) and so does
/// `qemu-img check`, except that QEMU counts the journal region (known only
/// to us) as leaked clusters: exactly those, and nothing else, may show.
#[track_caller]
pub fn assert_clean(dir: &Path, image: &Path) {
    let image = image.to_str().unwrap();
    ok(qj(dir, &["check", image]));
    let info: serde_json::Value =
        serde_json::from_str(&ok(qj(dir, &["info", "--output", "json", image]))).unwrap();
    let journal_clusters = info["qj"]["journal"]["size"].as_u64().unwrap_or(0)
        / info["cluster-size"].as_u64().unwrap();
    let out = run(
        "qemu-img",
        &["check", "-f", "qcow2", "--output=json", image],
        dir,
    );
    let check: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("qemu-img check: {e}: {}", text(&out.stderr)));
    assert_eq!(check["check-errors"], 0, "{check}");
    assert!(check.get("corruptions").is_none(), "{check}");
    assert_eq!(
        check.get("leaks").and_then(|l| l.as_u64()).unwrap_or(0),
        journal_clusters,
        "{check}"
    );
    let want_exit = if journal_clusters == 0 { 0 } else { 3 };
    assert_eq!(out.status.code(), Some(want_exit), "{check}");
}

/// A running `qj serve`.
pub struct Server {
    child: Option<Child>,
    /// The socket it listens on.
    pub socket: PathBuf,
}

impl Server {
    /// Starts `qj serve -k SOCKET EXTRA... IMAGE` and waits until it
    /// accepts connections (it prints its URI then).
    pub fn start(image: &Path, socket: &Path, extra: &[&str]) -> Server {
        let mut args = vec!["-k", socket.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (child, _) = Self::spawn(image, &args);
        Server {
            child: Some(child),
            socket: socket.to_path_buf(),
        }
    }

    /// Starts `qj serve ARGS... IMAGE`; returns the process and the URI it
    /// printed once listening.
    pub fn spawn(image: &Path, args: &[&str]) -> (Child, String) {
        let mut child = Command::new(qj_bin())
            .arg("serve")
            .args(args)
            .arg(image)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting qj serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(uri) = line.trim().strip_prefix("serving on ") else {
            let out = child.wait_with_output().unwrap();
            panic!(
                "qj serve did not start: {line}{}{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        };
        let uri = uri.to_string();
        (child, uri)
    }

    /// A server started with [`Server::spawn`] (on TCP, say).
    pub fn adopt(child: Child) -> Server {
        Server {
            child: Some(child),
            socket: PathBuf::new(),
        }
    }

    /// The URI of the default export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM, then waits: the server must exit 0 with nothing on stderr.
    pub fn stop(mut self) {
        let child = self.child.take().unwrap();
        let pid = child.id().to_string();
        ok(run("kill", &["-TERM", &pid], Path::new("/")));
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "qj serve exit {:?}: {}",
            out.status.code(),
            text(&out.stderr)
        );
        assert!(!text(&out.stderr).contains("panicked"));
    }

    /// SIGKILL, then waits: a crash.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Waits for the server to exit on its own; returns its output.
    pub fn wait(mut self) -> Output {
        self.child.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
