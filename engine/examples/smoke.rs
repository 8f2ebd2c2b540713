//! Writes a few patterns into a new image: `cargo run --example smoke -- FILE`.
use qj_engine::{CreateOptions, Image, OpenOptions};
fn main() -> qj_engine::Result<()> {
    let path = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: smoke FILE"));
    let cs: u64 = std::env::args()
        .nth(2)
        .map_or(65536, |s| s.parse().unwrap());
    let rb: u32 = std::env::args().nth(3).map_or(16, |s| s.parse().unwrap());
    Image::create_path(
        &path,
        &CreateOptions {
            virtual_size: 64 << 20,
            cluster_size: cs,
            refcount_bits: rb,
            ..Default::default()
        },
    )?;
    let img = Image::open_path(&path, &OpenOptions::read_write())?;
    img.write(&vec![0xab; 65536], 0)?;
    img.write(&vec![0xcd; 1000], 1 << 20)?;
    img.flush()?;
    img.write_zeroes(0, 4096)?;
    img.discard(32 << 20, 1 << 20)?;
    img.write(&vec![0xef; 3 << 20], 40 << 20)?;
    img.resize(128 << 20)?;
    img.write(&vec![0x11; 4096], 100 << 20)?;
    println!("{:?}", img.stats());
    img.close()
}
