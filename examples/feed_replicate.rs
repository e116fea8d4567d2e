//! A writer appends a small feed on disk; a sparse replica that knows only the public key
//! fetches every other block with proofs, verifies them, and prints what it holds.
//!
//! Run: `cargo run --release --example feed_replicate`

use feedsync::core::{Feed, crypto};
use feedsync::storage::DiskStorage;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut writer = Feed::create(
        DiskStorage::open(dir.path().join("writer"))?,
        crypto::generate_key(),
    )?;
    for i in 0..10 {
        writer.append(format!("block number {i}").as_bytes())?;
    }
    println!(
        "writer: {} blocks, public key {}",
        writer.len(),
        blake3::Hash::from(writer.public_key())
    );

    let mut replica = Feed::create_replica(
        DiskStorage::open(dir.path().join("replica"))?,
        writer.public_key(),
    )?;
    // The first request asks for an upgrade: the writer's newest roots and signature.
    for i in (0..writer.len()).step_by(2) {
        let proof = writer.proof(i, 1, replica.len(), replica.len() < writer.len())?;
        let v = replica.verify_and_store(i, &[writer.get(i)?], &proof)?;
        println!(
            "replica: verified block {i} ({} proof nodes){}",
            proof.nodes.len(),
            v.upgraded_to
                .map(|l| format!(", now trusts length {l}"))
                .unwrap_or_default()
        );
    }
    for i in 0..replica.len() {
        match replica.get(i) {
            Ok(b) => println!("  {i}: {}", String::from_utf8_lossy(&b)),
            Err(e) => println!("  {i}: ({e})"),
        }
    }
    replica.verify_all()?;
    println!("replica re-verified everything it holds");
    Ok(())
}
