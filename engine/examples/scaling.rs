//! Open time of large virtual images and allocation cost as an image fills:
//! `cargo run --release -p qj-engine --example scaling -- DIR`.
use std::time::Instant;

use qj_engine::{CreateOptions, Image, OpenOptions};

fn main() -> qj_engine::Result<()> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "/tmp".into()));
    for (label, size) in [
        ("1 GiB", 1u64 << 30),
        ("1 TiB", 1 << 40),
        ("16 TiB", 16 << 40),
    ] {
        let path = dir.join("scaling-open.qcow2");
        Image::create_path(
            &path,
            &CreateOptions {
                virtual_size: size,
                ..Default::default()
            },
        )?;
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            let img = Image::open_path(&path, &OpenOptions::read_write())?;
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
            img.close()?;
        }
        println!("open {label} virtual image: best of 20 = {best:.3} ms");
    }
    // Allocation cost as the image fills: time per 4 KiB allocating write in
    // successive windows of 16384 clusters (1 GiB of guest space each).
    let path = dir.join("scaling-alloc.qcow2");
    let cs = 65536u64;
    Image::create_path(
        &path,
        &CreateOptions {
            virtual_size: 64 << 30,
            cluster_size: cs,
            ..Default::default()
        },
    )?;
    let img = Image::open_path(&path, &OpenOptions::read_write())?;
    let buf = vec![0x77u8; 4096];
    let window = 16384u64;
    for w in 0..8u64 {
        let t = Instant::now();
        for i in 0..window {
            img.write(&buf, (w * window + i) * cs)?;
        }
        img.flush()?;
        let us = t.elapsed().as_secs_f64() * 1e6 / window as f64;
        println!(
            "allocating writes, clusters {:>6}..{:>6}: {us:.2} us/op",
            w * window,
            (w + 1) * window
        );
    }
    img.close()?;
    let _ = std::fs::remove_file(dir.join("scaling-open.qcow2"));
    let _ = std::fs::remove_file(path);
    Ok(())
}
