//! Helpers shared by the integration tests.

/// Deterministic pseudo-random content of block `i`, `size` bytes long.
pub fn block(i: u64, size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    blake3::Hasher::new()
        .update(&i.to_le_bytes())
        .finalize_xof()
        .fill(&mut b);
    b
}
