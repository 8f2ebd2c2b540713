//! The content hash of a cluster: SHA-256 (algorithm 1 of spec §8.5),
//! from the `sha2` crate, which uses the CPU's SHA extensions (x86 SHA-NI,
//! ARMv8 SHA2) when it finds them at run time.

use sha2::{Digest, Sha256};

/// Hash algorithm number of SHA-256 in dedup descriptors (spec §8.5).
pub const HASH_ALGORITHM_SHA256: u8 = 1;

/// A cluster's SHA-256.
pub type ClusterHash = [u8; 32];

/// The SHA-256 of `data`.
pub fn cluster_hash(data: &[u8]) -> ClusterHash {
    Sha256::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256() {
        // FIPS 180-2 test vector "abc".
        let h = cluster_hash(b"abc");
        assert_eq!(
            h[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "SHA-256(\"abc\") starts ba7816bf"
        );
        assert_eq!(h[28..], [0xf2, 0x00, 0x15, 0xad]);
    }
}
