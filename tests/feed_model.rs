//! Model test: a writer feed and a sparse replica, driven by random operations, checked against
//! a plain `Vec<Vec<u8>>` of the blocks appended.

use ed25519_dalek::SigningKey;
use feedsync::core::{Feed, FeedError, MemoryStorage};
use proptest::prelude::*;
use std::collections::BTreeSet;

mod common;

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<u8>),
    Batch(Vec<Vec<u8>>),
    Get(u64),
    /// Replicate blocks `start..start+count` (indices taken modulo the length), with an upgrade
    /// to the writer's newest tree or relative to the replica's trusted length.
    Replicate {
        start: u64,
        count: u64,
        upgrade: bool,
    },
    /// Reopen both feeds from their storage.
    Reopen,
}

fn block() -> impl Strategy<Value = Vec<u8>> {
    // Boundary sizes around a 1 KiB "block size", plus empty blocks.
    prop_oneof![
        Just(0usize),
        Just(1),
        Just(1023),
        Just(1024),
        Just(1025),
        0..3000usize
    ]
    .prop_flat_map(|n| proptest::collection::vec(any::<u8>(), n))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => block().prop_map(Op::Append),
        2 => proptest::collection::vec(block(), 1..12).prop_map(Op::Batch),
        3 => any::<u64>().prop_map(Op::Get),
        5 => (any::<u64>(), 1..20u64, any::<bool>())
            .prop_map(|(start, count, upgrade)| Op::Replicate { start, count, upgrade }),
        1 => Just(Op::Reopen),
    ]
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let key = SigningKey::from_bytes(&[42u8; 32]);
    let mut writer = Feed::create(MemoryStorage::new(), key.clone()).unwrap();
    let mut replica =
        Feed::create_replica(MemoryStorage::new(), key.verifying_key().to_bytes()).unwrap();
    let mut model: Vec<Vec<u8>> = Vec::new();
    let mut held: BTreeSet<u64> = BTreeSet::new();

    for op in ops {
        match op {
            Op::Append(b) => {
                let i = writer.append(&b).unwrap();
                prop_assert_eq!(i, model.len() as u64);
                model.push(b);
            }
            Op::Batch(bs) => {
                let len = writer.append_batch(&bs).unwrap();
                model.extend(bs);
                prop_assert_eq!(len, model.len() as u64);
            }
            Op::Get(i) => {
                if model.is_empty() {
                    prop_assert!(matches!(writer.get(i), Err(FeedError::NotHeld(_))));
                    continue;
                }
                let i = i % model.len() as u64;
                prop_assert_eq!(&writer.get(i).unwrap(), &model[i as usize]);
                match replica.get(i) {
                    Ok(b) => {
                        prop_assert!(held.contains(&i));
                        prop_assert_eq!(&b, &model[i as usize]);
                    }
                    Err(FeedError::NotHeld(_)) => prop_assert!(!held.contains(&i)),
                    Err(e) => return Err(TestCaseError::fail(format!("replica get: {e}"))),
                }
            }
            Op::Replicate {
                start,
                count,
                upgrade,
            } => {
                if model.is_empty() {
                    continue;
                }
                // Without an upgrade the range must lie inside the replica's trusted tree.
                let limit = if upgrade {
                    model.len() as u64
                } else {
                    replica.len()
                };
                if limit == 0 {
                    continue;
                }
                let start = start % limit;
                let count = count.min(limit - start);
                let proof = writer.proof(start, count, replica.len(), upgrade).unwrap();
                let blocks: Vec<&[u8]> = (start..start + count)
                    .map(|i| model[i as usize].as_slice())
                    .collect();
                let v = replica.verify_and_store(start, &blocks, &proof).unwrap();
                let fresh = (start..start + count).filter(|i| held.insert(*i)).count() as u64;
                prop_assert_eq!(v.new_blocks, fresh);
                if upgrade {
                    prop_assert_eq!(replica.len(), writer.len());
                    prop_assert_eq!(replica.roots(), writer.roots());
                }
            }
            Op::Reopen => {
                writer = Feed::open(writer.into_storage()).unwrap();
                replica = Feed::open(replica.into_storage()).unwrap();
            }
        }
        prop_assert_eq!(writer.len(), model.len() as u64);
        prop_assert_eq!(
            writer.byte_len(),
            model.iter().map(|b| b.len() as u64).sum::<u64>()
        );
        prop_assert_eq!(replica.bitfield().count(), held.len() as u64);
    }
    // Finally the replica's whole held set, and both feeds, re-verify from storage.
    for &i in &held {
        prop_assert_eq!(&replica.get(i).unwrap(), &model[i as usize]);
    }
    writer.verify_all().unwrap();
    replica.verify_all().unwrap();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// 48 cases of up to 250 operations each: about six thousand operations per run.
    #[test]
    fn feed_matches_vec_model(ops in proptest::collection::vec(op(), 1..250)) {
        run(ops)?;
    }
}

/// A replica that fetches everything one block at a time, in a scattered order, ends up
/// byte-identical to the writer (a long deterministic run beside the random ones).
#[test]
fn scattered_single_block_replication() {
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let mut writer = Feed::create(MemoryStorage::new(), key.clone()).unwrap();
    let blocks: Vec<Vec<u8>> = (0..1000u64)
        .map(|i| common::bytes(i, 4 * (1 + i as usize % 40)))
        .collect();
    writer.append_batch(&blocks).unwrap();
    let mut replica =
        Feed::create_replica(MemoryStorage::new(), key.verifying_key().to_bytes()).unwrap();
    let up = writer.proof(0, 0, 0, true).unwrap();
    replica.verify_and_store::<&[u8]>(0, &[], &up).unwrap();
    assert_eq!(replica.len(), 1000);
    // 1000 and 7 are coprime: this visits every block once, far from in order.
    for k in 0..1000u64 {
        let i = (k * 7 + 3) % 1000;
        let proof = writer.proof(i, 1, replica.len(), false).unwrap();
        replica
            .verify_and_store(i, &[&blocks[i as usize]], &proof)
            .unwrap();
    }
    for i in 0..1000u64 {
        assert_eq!(replica.get(i).unwrap(), blocks[i as usize]);
    }
    replica.verify_all().unwrap();
}
