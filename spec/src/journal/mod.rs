//! The qjournal on-disk format: header slots, log blocks, transactions and
//! descriptors, as pure encode/decode code. `spec/qjournal.md` is the prose
//! specification; its test vectors are checked against this module.

mod bytes;

pub mod block;
pub mod bounds;
pub mod checksum;
pub mod descriptor;
pub mod error;
pub mod geometry;
pub mod header;
pub mod transaction;

pub use block::{encode_padding, BlockHeader, BlockType, BLOCK_HEADER_BYTES, BLOCK_MAGIC};
pub use bounds::TargetBounds;
pub use descriptor::{
    CopyChunk, DataChecksumChunk, DedupEntry, Descriptor, RevokeRange, WriteChunk, PRIVATE_TYPE_MIN,
};
pub use error::JournalFormatError;
pub use geometry::JournalGeometry;
pub use header::JournalHeader;
pub use transaction::{
    blocks_needed, encode_transaction, parse_transaction, verify_transaction, EncodedTransaction,
    ParsedTransaction, TransactionHeader, TransactionParams,
};
