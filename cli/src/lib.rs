//! The parts of the `qj` binary that other programs link: the NBD protocol
//! engine (`qj serve` without its sockets), so that the fuzz targets in
//! `fuzz/` drive the same code the server runs.

#![warn(missing_docs)]

pub mod nbd;
