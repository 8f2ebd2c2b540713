//! On-disk formats of qcow2 and of the qjournal, and the wire formats that
//! carry them (NBD, dm-log-writes), as pure code with no I/O.
//!
//! Every structure that reaches the disk is defined in exactly one file of
//! this crate, with its encoder and a decoder that returns a typed error
//! naming the field and its offset for malformed bytes; nothing here panics
//! on input. The prose specification of the journal lives in
//! `spec/qjournal.md` next to this crate, and its test vectors are checked
//! against this code.

#![warn(missing_docs)]

pub mod error;
pub mod journal;
pub mod log_writes;
pub mod nbd;
pub mod qcow2;
pub mod units;

pub use error::FormatError;
