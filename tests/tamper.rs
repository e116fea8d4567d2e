//! Every kind of tampering a peer could try is refused, each with its own error, and nothing
//! from a refused message is stored.

use ed25519_dalek::SigningKey;
use feedsync::core::{Feed, FeedError, MemoryStorage, Proof, VerifyError};

mod common;

struct Setup {
    writer: Feed<MemoryStorage>,
    replica: Feed<MemoryStorage>,
    blocks: Vec<Vec<u8>>,
}

/// A writer with 11 blocks and a replica that trusts the tree at length 5 but holds no block.
fn setup() -> Setup {
    let key = SigningKey::from_bytes(&[9u8; 32]);
    let mut writer = Feed::create(MemoryStorage::new(), key.clone()).unwrap();
    let blocks: Vec<Vec<u8>> = (0..11u64)
        .map(|i| common::bytes(i, 100 + i as usize))
        .collect();
    writer.append_batch(&blocks[..5]).unwrap();
    let mut replica =
        Feed::create_replica(MemoryStorage::new(), key.verifying_key().to_bytes()).unwrap();
    let up = writer.proof(0, 0, 0, true).unwrap();
    replica.verify_and_store::<&[u8]>(0, &[], &up).unwrap();
    writer.append_batch(&blocks[5..]).unwrap();
    assert_eq!(replica.len(), 5);
    Setup {
        writer,
        replica,
        blocks,
    }
}

fn verify_err(
    replica: &mut Feed<MemoryStorage>,
    index: u64,
    blocks: &[Vec<u8>],
    proof: &Proof,
) -> VerifyError {
    let before = (replica.len(), replica.bitfield().count());
    match replica.verify_and_store(index, blocks, proof) {
        Err(FeedError::Verify(e)) => {
            assert_eq!(
                (replica.len(), replica.bitfield().count()),
                before,
                "state changed"
            );
            e
        }
        other => panic!("expected a verification error, got {other:?}"),
    }
}

#[test]
fn honest_data_verifies() {
    let mut s = setup();
    let p = s.writer.proof(2, 1, 5, false).unwrap();
    s.replica.verify_and_store(2, &[&s.blocks[2]], &p).unwrap();
    let p = s.writer.proof(7, 3, 5, true).unwrap();
    s.replica.verify_and_store(7, &s.blocks[7..10], &p).unwrap();
    assert_eq!(s.replica.len(), 11);
}

#[test]
fn flipped_bit_in_block() {
    let mut s = setup();
    let p = s.writer.proof(3, 1, 5, false).unwrap();
    let mut b = s.blocks[3].clone();
    b[17] ^= 0x04;
    assert_eq!(
        verify_err(&mut s.replica, 3, &[b], &p),
        VerifyError::BlockMismatch { index: 3 }
    );
}

#[test]
fn flipped_bit_in_proof_node() {
    let mut s = setup();
    let mut p = s.writer.proof(3, 1, 5, false).unwrap();
    assert!(p.nodes.len() > 1, "block 3 of 5 has uncles");
    p.nodes[1].hash[0] ^= 1;
    assert!(matches!(
        verify_err(&mut s.replica, 3, &[s.blocks[3].clone()], &p),
        VerifyError::ProofMismatch { .. }
    ));
    // The size field is covered too.
    let mut p = s.writer.proof(3, 1, 5, false).unwrap();
    p.nodes[1].size += 1;
    assert!(matches!(
        verify_err(&mut s.replica, 3, &[s.blocks[3].clone()], &p),
        VerifyError::ProofMismatch { .. }
    ));
}

#[test]
fn flipped_bit_in_signature() {
    let mut s = setup();
    let mut p = s.writer.proof(8, 1, 5, true).unwrap();
    p.upgrade.as_mut().unwrap().signature[5] ^= 0x10;
    assert_eq!(
        verify_err(&mut s.replica, 8, &[s.blocks[8].clone()], &p),
        VerifyError::BadSignature { length: 11 }
    );
}

#[test]
fn proof_for_the_wrong_index() {
    let mut s = setup();
    let p = s.writer.proof(1, 1, 5, false).unwrap();
    // Block 2's bytes, served with block 1's proof.
    assert_eq!(
        verify_err(&mut s.replica, 2, &[s.blocks[2].clone()], &p),
        VerifyError::WrongIndex {
            expected: 2,
            got: 1
        }
    );
}

#[test]
fn signature_by_another_key() {
    let mut s = setup();
    // A different writer signs exactly the same tree.
    let mut other =
        Feed::create(MemoryStorage::new(), SigningKey::from_bytes(&[10u8; 32])).unwrap();
    other.append_batch(&s.blocks).unwrap();
    let forged = other.proof(8, 1, 5, true).unwrap();
    let honest = s.writer.proof(8, 1, 5, true).unwrap();
    assert_eq!(forged.nodes, honest.nodes, "same blocks, same tree");
    assert_eq!(
        verify_err(&mut s.replica, 8, &[s.blocks[8].clone()], &forged),
        VerifyError::BadSignature { length: 11 }
    );
}

#[test]
fn older_signature_replayed_for_a_longer_length() {
    let mut s = setup();
    let old_sig = s.replica.signed_tree().unwrap().2;
    let mut p = s.writer.proof(8, 1, 5, true).unwrap();
    p.upgrade.as_mut().unwrap().signature = old_sig;
    assert_eq!(
        verify_err(&mut s.replica, 8, &[s.blocks[8].clone()], &p),
        VerifyError::ReplayedSignature {
            claimed: 11,
            known: 5
        }
    );
}

#[test]
fn truncated_proof() {
    let mut s = setup();
    let mut p = s.writer.proof(3, 1, 5, false).unwrap();
    let dropped = p.nodes.pop().unwrap();
    assert_eq!(
        verify_err(&mut s.replica, 3, &[s.blocks[3].clone()], &p),
        VerifyError::TruncatedProof {
            missing: dropped.index
        }
    );
    // Missing the leaf itself.
    let p = Proof {
        nodes: vec![],
        upgrade: None,
    };
    assert_eq!(
        verify_err(&mut s.replica, 3, &[s.blocks[3].clone()], &p),
        VerifyError::TruncatedProof { missing: 6 }
    );
}

#[test]
fn structural_abuse_is_malformed_not_a_panic() {
    let mut s = setup();
    // An extra node that the walk never needs.
    let mut p = s.writer.proof(3, 1, 5, false).unwrap();
    let extra = s.writer.proof(0, 1, 5, false).unwrap().nodes[0];
    p.nodes.push(extra);
    assert!(matches!(
        verify_err(&mut s.replica, 3, &[s.blocks[3].clone()], &p),
        VerifyError::Malformed(_)
    ));
    // Roots that do not fit the claimed length.
    let mut p = s.writer.proof(8, 1, 5, true).unwrap();
    p.upgrade.as_mut().unwrap().length = 12;
    assert!(matches!(
        verify_err(&mut s.replica, 8, &[s.blocks[8].clone()], &p),
        VerifyError::Malformed(_)
    ));
    // Blocks beyond the trusted tree without an upgrade.
    let p = s.writer.proof(8, 1, 11, false).unwrap();
    assert_eq!(
        verify_err(&mut s.replica, 8, &[s.blocks[8].clone()], &p),
        VerifyError::OutOfRange { end: 9, length: 5 }
    );
    // An index near u64::MAX.
    let p = Proof {
        nodes: vec![],
        upgrade: None,
    };
    assert!(matches!(
        verify_err(&mut s.replica, u64::MAX, &[vec![1u8]], &p),
        VerifyError::Malformed(_)
    ));
}

#[test]
fn stale_upgrade_refused() {
    let mut s = setup();
    let p = s.writer.proof(8, 1, 5, true).unwrap();
    s.replica.verify_and_store(8, &[&s.blocks[8]], &p).unwrap();
    // A lagging peer offers the tree at length 5 again.
    let mut lagging =
        Feed::create(MemoryStorage::new(), SigningKey::from_bytes(&[9u8; 32])).unwrap();
    lagging.append_batch(&s.blocks[..5]).unwrap();
    let p = lagging.proof(0, 0, 0, true).unwrap();
    assert_eq!(
        verify_err(&mut s.replica, 0, &Vec::<Vec<u8>>::new(), &p),
        VerifyError::StaleUpgrade {
            length: 5,
            trusted: 11
        }
    );
}

#[test]
fn status_claims_are_checked() {
    let s = setup();
    let (len, tree_hash, sig) = s.writer.signed_tree().unwrap();
    assert!(s.replica.verify_status(len, &tree_hash, &sig));
    assert!(!s.replica.verify_status(len + 1, &tree_hash, &sig));
    let mut bad = sig;
    bad[0] ^= 1;
    assert!(!s.replica.verify_status(len, &tree_hash, &bad));
}

#[test]
fn forked_history_is_detected() {
    let mut s = setup();
    // The same key signs a different history (a restored backup re-appending other data).
    let mut fork = Feed::create(MemoryStorage::new(), SigningKey::from_bytes(&[9u8; 32])).unwrap();
    let other: Vec<Vec<u8>> = (0..11u64).map(|i| common::bytes(i ^ 0x55, 50)).collect();
    fork.append_batch(&other).unwrap();
    let p = fork.proof(8, 1, 5, true).unwrap();
    assert!(matches!(
        verify_err(&mut s.replica, 8, &[other[8].clone()], &p),
        VerifyError::Fork { length: 11, .. }
    ));
    // Same length, different roots: also a fork, even with no blocks attached.
    let mut same_len =
        Feed::create(MemoryStorage::new(), SigningKey::from_bytes(&[9u8; 32])).unwrap();
    same_len.append_batch(&other[..5]).unwrap();
    let p = same_len.proof(0, 0, 5, true).unwrap();
    assert!(matches!(
        verify_err(&mut s.replica, 0, &Vec::<Vec<u8>>::new(), &p),
        VerifyError::Fork { length: 5, .. }
    ));
    // The honest extension still verifies, including its consistency nodes.
    let p = s.writer.proof(0, 0, 5, true).unwrap();
    assert!(
        !p.nodes.is_empty(),
        "old roots 3 and 8 need nodes to reach root 7"
    );
    s.replica.verify_and_store::<&[u8]>(0, &[], &p).unwrap();
    assert_eq!(s.replica.len(), 11);
}

#[test]
fn consistency_nodes_cannot_be_dropped_or_padded() {
    let mut s = setup();
    let mut p = s.writer.proof(0, 0, 5, true).unwrap();
    let last = p.nodes.pop().unwrap();
    assert_eq!(
        verify_err(&mut s.replica, 0, &Vec::<Vec<u8>>::new(), &p),
        VerifyError::TruncatedProof {
            missing: last.index
        }
    );
    p.nodes.push(last);
    p.nodes
        .push(s.writer.proof(10, 1, 11, false).unwrap().nodes[0]);
    assert!(matches!(
        verify_err(&mut s.replica, 0, &Vec::<Vec<u8>>::new(), &p),
        VerifyError::Malformed(_)
    ));
}

#[test]
fn absurd_lengths_are_refused_before_any_tree_arithmetic() {
    let mut s = setup();
    for length in [
        feedsync::protocol::MAX_FEED_LENGTH + 1,
        1 << 63,
        (1 << 63) + 1,
        u64::MAX,
    ] {
        let mut p = s.writer.proof(0, 0, 5, true).unwrap();
        p.upgrade.as_mut().unwrap().length = length;
        assert!(matches!(
            verify_err(&mut s.replica, 0, &Vec::<Vec<u8>>::new(), &p),
            VerifyError::Malformed(_)
        ));
        let (_, tree_hash, sig) = s.writer.signed_tree().unwrap();
        assert!(!s.replica.verify_status(length, &tree_hash, &sig));
    }
}
