//! `qj serve` driven by real NBD clients: qemu-io and qemu-img, the libnbd
//! tools (nbdinfo, nbdcopy, nbdsh) and fio's nbd engine, on both metadata
//! backends. After each, the server is stopped with SIGTERM and the image
//! must check clean with `qj check` and `qemu-img check`. A missing tool
//! fails the test: the clients are the oracle.

mod nbd_client;
mod serve_common;
mod support;

use std::path::Path;

use serde_json::Value;
use serve_common::{assert_clean, create, ok, qj, run, text, Server, BACKENDS};

fn qemu_io(dir: &Path, uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in commands {
        args.extend_from_slice(&["-c", c]);
    }
    let out = ok(run("qemu-io", &args, dir));
    assert!(!out.contains("failed"), "{out}");
    out
}

fn run_with_system_python(program: &str, args: &[&str], dir: &Path) -> std::process::Output {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("PATH", path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"))
}

fn map_json(dir: &Path, uri: &str) -> Vec<Value> {
    let out = ok(run(
        "qemu-img",
        &["map", "-f", "raw", "--output=json", uri],
        dir,
    ));
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The map entry covering `offset`: (data, zero).
fn state_at(map: &[Value], offset: u64) -> (bool, bool) {
    let e = map
        .iter()
        .find(|e| {
            let start = e["start"].as_u64().unwrap();
            start <= offset && offset < start + e["length"].as_u64().unwrap()
        })
        .unwrap_or_else(|| panic!("no map entry at {offset}: {map:?}"));
    (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap())
}

#[test]
fn qemu_io_and_qemu_img_over_nbd() {
    for (backend, opts) in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let image = create(d, "a.qcow2", opts);
        let server = Server::start(&image, &d.join("s.sock"), &["-t", "-e", "4"]);
        let uri = server.uri();
        qemu_io(
            d,
            &uri,
            &[
                "write -P 0xa1 0 128k",
                "write -f -P 0xb2 1M 4k",
                "write -P 0xc3 2M 64k",
                "write -z 2M 64k",
                "write -P 0xd4 3M 64k",
                "discard 3M 64k",
                "flush",
            ],
        );
        qemu_io(
            d,
            &uri,
            &[
                "read -P 0xa1 0 128k",
                "read -P 0xb2 1M 4k",
                "read -P 0 2M 64k",
                "read -P 0 3M 64k",
            ],
        );
        let map = map_json(d, &uri);
        assert_eq!(state_at(&map, 0), (true, false), "{backend}: {map:?}");
        assert_eq!(state_at(&map, 1 << 20), (true, false), "{backend}");
        assert_eq!(
            state_at(&map, 3 << 20),
            (false, true),
            "{backend}: discarded"
        );
        assert_eq!(
            state_at(&map, 8 << 20),
            (false, true),
            "{backend}: never written"
        );

        // convert in: a raw file with a pattern onto the export; out: back
        // to a raw file, byte for byte.
        let src = d.join("src.raw");
        ok(run(
            "qemu-img",
            &["create", "-f", "raw", "src.raw", "64M"],
            d,
        ));
        ok(run(
            "qemu-io",
            &["-f", "raw", "src.raw", "-c", "write -P 0x77 5M 192k"],
            d,
        ));
        ok(run(
            "qemu-img",
            &["convert", "-n", "-f", "raw", "-O", "raw", "src.raw", &uri],
            d,
        ));
        ok(run(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "raw", &uri, "out.raw"],
            d,
        ));
        let out = std::fs::read(d.join("out.raw")).unwrap();
        let want = std::fs::read(&src).unwrap();
        assert!(
            out == want,
            "{backend}: convert out differs from convert in"
        );
        server.stop();
        assert_clean(d, &image);
        // What went in through NBD is in the image.
        ok(run(
            "qemu-io",
            &["-f", "qcow2", "-r", "a.qcow2", "-c", "read -P 0x77 5M 192k"],
            d,
        ));
    }
}

#[test]
fn libnbd_tools_see_the_export() {
    for (backend, opts) in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let image = create(d, "a.qcow2", opts);
        let server = Server::start(&image, &d.join("s.sock"), &["-t", "-e", "4"]);
        let uri = server.uri();
        let info: Value = serde_json::from_str(&ok(run("nbdinfo", &["--json", &uri], d))).unwrap();
        let export = &info["exports"][0];
        assert_eq!(export["export-size"], 64 << 20, "{backend}: {info}");
        assert_eq!(export["can_multi_conn"], true);
        assert_eq!(export["can_fua"], true);
        assert_eq!(export["block_size_minimum"], 512);
        assert_eq!(export["block_size_maximum"], 32 << 20);

        // nbdsh writes through libnbd's Python API, with FUA. It runs the
        // first python3 on PATH: the system's, where python3-libnbd lives.
        ok(run_with_system_python(
            "nbdsh",
            &[
                "-u",
                &uri,
                "-c",
                "h.pwrite(b'\\x42' * 65536, 1048576, nbd.CMD_FLAG_FUA)",
                "-c",
                "assert h.pread(65536, 1048576) == b'\\x42' * 65536",
                "-c",
                "h.zero(65536, 2097152)",
                "-c",
                "h.flush()",
            ],
            d,
        ));
        let map = ok(run("nbdinfo", &["--map", &uri], d));
        assert!(
            map.lines()
                .any(|l| l.contains("1048576") && l.contains("data")),
            "{backend}: {map}"
        );
        assert!(map.contains("hole,zero"), "{backend}: {map}");

        // nbdcopy out and back in.
        ok(run("nbdcopy", &[&uri, "copy.raw"], d));
        let copy = std::fs::read(d.join("copy.raw")).unwrap();
        assert_eq!(copy.len(), 64 << 20);
        assert!(copy[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0x42));
        let mut source = vec![0u8; 64 << 20];
        source[7 << 20..(7 << 20) + 4096].fill(0x99);
        std::fs::write(d.join("in.raw"), &source).unwrap();
        ok(run("nbdcopy", &["in.raw", &uri], d));
        ok(run("nbdcopy", &[&uri, "copy2.raw"], d));
        assert!(
            std::fs::read(d.join("copy2.raw")).unwrap() == source,
            "{backend}"
        );
        server.stop();
        assert_clean(d, &image);
    }
}

fn fio(dir: &Path, uri: &str, name: &str, extra: &[&str]) -> Value {
    let output = dir.join(format!("{name}.json"));
    let mut args = vec![
        format!("--name={name}"),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--output-format=json".into(),
        format!("--output={}", output.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(run("fio", &args, dir));
    serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap()
}

#[test]
fn fio_verifies_at_qd1_and_qd8_with_four_connections() {
    for (backend, opts) in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let image = create(d, "a.qcow2", opts);
        // fio's probe connection plus one per job.
        let server = Server::start(&image, &d.join("s.sock"), &["-t", "-e", "8"]);
        let uri = server.uri();
        for (depth, jobs) in [("1", "1"), ("8", "4")] {
            let name = format!("verify-qd{depth}-j{jobs}");
            let report = fio(
                d,
                &uri,
                &name,
                &[
                    "--rw=randwrite",
                    "--bs=4k",
                    "--size=4M",
                    "--offset_increment=16M",
                    &format!("--iodepth={depth}"),
                    &format!("--numjobs={jobs}"),
                    "--fsync=16",
                    "--verify=crc32c",
                    "--verify_fatal=1",
                    "--do_verify=1",
                ],
            );
            let jobs_run = report["jobs"].as_array().unwrap();
            assert_eq!(jobs_run.len(), jobs.parse::<usize>().unwrap());
            for job in jobs_run {
                assert_eq!(job["error"], 0, "{backend} {name}: {job}");
                // Every block written was read back and verified.
                assert_eq!(job["write"]["io_bytes"], 4 << 20, "{backend} {name}");
                assert_eq!(job["read"]["io_bytes"], 4 << 20, "{backend} {name}");
            }
        }
        server.stop();
        assert_clean(d, &image);
    }
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = create(d, "a.qcow2", &[]);
    ok(qj(d, &["io", "a.qcow2", "-c", "write -P 0x11 0 64k"]));
    let server = Server::start(&image, &d.join("s.sock"), &["-r", "-t"]);
    let uri = server.uri();
    let read = ok(run(
        "qemu-io",
        &["-r", "-f", "raw", &uri, "-c", "read -P 0x11 0 64k"],
        d,
    ));
    assert!(!read.contains("failed"), "{read}");
    // QEMU sees the read-only flag and refuses to open for writing.
    let out = run("qemu-io", &["-f", "raw", &uri, "-c", "write 0 4k"], d);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
    let info: Value = serde_json::from_str(&ok(run("nbdinfo", &["--json", &uri], d))).unwrap();
    assert_eq!(info["exports"][0]["is_read_only"], true);
    server.stop();
    assert_clean(d, &image);
}

#[test]
fn without_persistent_the_server_exits_after_the_last_client() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = create(d, "a.qcow2", &["-o", "journal=on"]);
    // No -k and no -b: a Unix socket next to the image.
    let (child, uri) = Server::spawn(&image, &[]);
    let server = Server::adopt(child);
    let socket = d.join("a.qcow2.sock");
    assert_eq!(uri, format!("nbd+unix:///?socket={}", socket.display()));
    qemu_io(d, &uri, &["write -P 0x5e 0 64k"]);
    let out = server.wait();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!socket.exists(), "the socket file is removed");
    assert_clean(d, &image);
    ok(qj(d, &["io", "-r", "a.qcow2", "-c", "read -P 0x5e 0 64k"]));
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "a.qcow2", &[]);
    std::fs::write(d.join("plain"), b"x").unwrap();
    for (args, want) in [
        (vec!["serve", "-k", "plain", "a.qcow2"], "not a socket"),
        (vec!["serve", "missing.qcow2"], "missing.qcow2"),
        (vec!["serve", "-e", "0", "a.qcow2"], "0"),
        (
            vec!["serve", "-k", "s", "-b", "127.0.0.1", "a.qcow2"],
            "cannot be used with",
        ),
    ] {
        let out = qj(d, &args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("qj: ") && stderr.contains(want),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn sigterm_with_a_client_connected_ends_cleanly() {
    for (backend, opts) in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let image = create(d, "a.qcow2", opts);
        let server = Server::start(&image, &d.join("s.sock"), &["-t", "-e", "2"]);
        let mut client = nbd_client::Client::connect(&server.socket).unwrap();
        client.write(0, &[0x3c; 65536], 0).unwrap();
        // SIGTERM while the client stays connected: its acknowledged write
        // is flushed by the clean close, and the client sees the end.
        server.stop();
        assert!(
            client.read(0, 512).is_err(),
            "{backend}: the connection is closed"
        );
        assert_clean(d, &image);
        ok(qj(d, &["io", "-r", "a.qcow2", "-c", "read -P 0x3c 0 64k"]));
    }
}

#[test]
fn tcp_only_on_the_address_given() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = create(d, "a.qcow2", &[]);
    // A port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let (child, uri) = Server::spawn(&image, &["-t", "-b", "127.0.0.1", "-p", &port]);
    let server = Server::adopt(child);
    assert_eq!(uri, format!("nbd://127.0.0.1:{port}/"));
    qemu_io(d, &uri, &["write -P 0x21 0 64k", "read -P 0x21 0 64k"]);
    assert!(!d.join("a.qcow2.sock").exists(), "no Unix socket with -b");
    server.stop();
    assert_clean(d, &image);
}

#[test]
fn cache_none_and_directsync_serve_through_o_direct() {
    for (backend, opts) in BACKENDS {
        for cache in ["none", "directsync"] {
            // On the project's disk: /tmp may be tmpfs, which has no O_DIRECT.
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
            let d = dir.path();
            let image = create(d, "a.qcow2", opts);
            let server = Server::start(&image, &d.join("s.sock"), &["--cache", cache]);
            let uri = server.uri();
            qemu_io(
                d,
                &uri,
                &[
                    "write -P 0xa1 0 128k",
                    "write -P 0xb2 1536 512",
                    "write -f -P 0xc3 1M 4k",
                    "flush",
                    "read -P 0xa1 0 1536",
                    "read -P 0xb2 1536 512",
                    "read -P 0xc3 1M 4k",
                ],
            );
            server.stop();
            assert_clean(d, &image);
            // The zeros reserved past the file's length (O_DIRECT only)
            // were given back at the clean close.
            let check = run("qemu-img", &["check", "--output=json", "a.qcow2"], d);
            let end = serde_json::from_slice::<Value>(&check.stdout).unwrap()["image-end-offset"]
                .as_u64()
                .unwrap();
            let file_len = std::fs::metadata(&image).unwrap().len();
            assert!(
                file_len <= end,
                "{backend} {cache}: the file ({file_len} bytes) ends past the image ({end})"
            );
            let out = qemu_img_io(d, &image, "read -P 0xb2 1536 512");
            assert!(
                out.status.success(),
                "{backend} {cache}: {}",
                text(&out.stderr)
            );
        }
    }
}

/// `qemu-io` on the image file itself, once the server is gone.
fn qemu_img_io(
    dir: &std::path::Path,
    image: &std::path::Path,
    command: &str,
) -> std::process::Output {
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", command, image.to_str().unwrap()],
        dir,
    )
}
