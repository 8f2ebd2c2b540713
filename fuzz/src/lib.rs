//! Helpers shared by the fuzz targets in `fuzz_targets/`: the targets
//! themselves are the `[[bin]]`s of this crate, built by `cargo fuzz`.

#![warn(missing_docs)]

pub mod bounded;
pub mod metadata;
pub mod refcounts;
