//! Golden wire vectors: every message type, built from fixed keys with a real signed tree and
//! real proofs, must encode to exactly the bytes in `protocol/vectors/`. A change to any
//! encoding — field order, tag, integer width — fails here. Regenerate deliberately (after a
//! protocol version bump) with `FEEDSYNC_BLESS=1 cargo test --test vectors`.

use ed25519_dalek::SigningKey;
use feedsync::core::{Feed, MemoryStorage, crypto};
use feedsync::protocol::*;
use std::path::PathBuf;

fn vectors() -> Vec<(&'static str, &'static str, Message)> {
    // Fixed writer key; ed25519 signatures are deterministic, so everything below is too.
    let key = SigningKey::from_bytes(&[0x11; 32]);
    let mut feed = Feed::create(MemoryStorage::new(), key).unwrap();
    feed.append_batch(&[b"hello".as_slice(), b"feedsync", b"!"])
        .unwrap();
    let pk = feed.public_key();
    let (length, tree_hash, signature) = feed.signed_tree().unwrap();
    let proof = feed.proof(1, 1, 0, true).unwrap();
    let handshake_hash = [0x22u8; 64];
    vec![
        (
            "00-hello",
            "Hello, version 1, no features",
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                features: 0,
                agent: "feedsync/0.1.0".into(),
            }),
        ),
        (
            "01-open",
            "Open channel 1 for the fixed feed; capability over handshake hash 0x22*64 as initiator",
            Message::Open(Open {
                channel: 1,
                discovery_key: feed.discovery_key(),
                capability: crypto::capability(&pk, &handshake_hash, true),
            }),
        ),
        (
            "02-close",
            "Close channel 1",
            Message::Close(Close { channel: 1 }),
        ),
        (
            "03-status",
            "Signed length 3 of the fixed feed",
            Message::Status(Status {
                channel: 1,
                length,
                tree_hash,
                signature,
            }),
        ),
        (
            "04-have",
            "Have blocks 0..3",
            Message::Have(Have {
                channel: 1,
                blocks: BlockSet::Range { start: 0, count: 3 },
            }),
        ),
        (
            "05-unhave",
            "Unhave runs: 2 present from 10, 3 absent, 1 present",
            Message::Unhave(Have {
                channel: 1,
                blocks: BlockSet::Runs {
                    start: 10,
                    runs: vec![2, 3, 1],
                },
            }),
        ),
        (
            "06-want",
            "Want blocks 0..1000",
            Message::Want(Want {
                channel: 1,
                blocks: BlockSet::Range {
                    start: 0,
                    count: 1000,
                },
            }),
        ),
        (
            "07-unwant",
            "Unwant block 300",
            Message::Unwant(Want {
                channel: 1,
                blocks: BlockSet::Range {
                    start: 300,
                    count: 1,
                },
            }),
        ),
        (
            "08-request",
            "Request id 7: block 1 with upgrade from length 0",
            Message::Request(Request {
                channel: 1,
                id: 7,
                index: 1,
                count: 1,
                length: 0,
                upgrade: true,
            }),
        ),
        (
            "09-cancel",
            "Cancel request 7",
            Message::Cancel(Cancel { channel: 1, id: 7 }),
        ),
        (
            "10-data",
            "Data answering request 7: block 1 with its proof and the upgrade to length 3",
            Message::Data(Data {
                channel: 1,
                id: 7,
                index: 1,
                blocks: vec![Block(feed.get(1).unwrap())],
                nodes: proof.nodes.clone(),
                upgrade: proof.upgrade.clone(),
            }),
        ),
        (
            "11-no-data",
            "No data for request 8",
            Message::NoData(NoData { channel: 1, id: 8 }),
        ),
        (
            "12-ping",
            "Ping nonce 0x0102030405060708",
            Message::Ping(Ping {
                nonce: 0x0102_0304_0506_0708,
            }),
        ),
        (
            "13-pong",
            "Pong echoing it",
            Message::Pong(Ping {
                nonce: 0x0102_0304_0506_0708,
            }),
        ),
        (
            "14-goodbye",
            "Goodbye: shutting down",
            Message::Goodbye(Goodbye {
                reason: GoodbyeReason::Shutdown,
            }),
        ),
    ]
}

mod common;

/// Hex in lines of 64 digits, as the vector files hold it.
fn to_hex(bytes: &[u8]) -> String {
    let hex = common::hex(bytes);
    hex.as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

fn from_hex(text: &str) -> Vec<u8> {
    let digits: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<String>()
        .split_whitespace()
        .collect();
    common::unhex(&digits).expect("hex digits in a vector file")
}

#[test]
fn golden_vectors_match_byte_for_byte() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("protocol/vectors");
    let bless = std::env::var_os("FEEDSYNC_BLESS").is_some();
    let all = vectors();
    let mut tags: Vec<u8> = Vec::new();
    for (name, what, msg) in &all {
        let frame = encode(msg).unwrap();
        let path = dir.join(format!("{name}.hex"));
        if bless {
            let text = format!(
                "# {what}\n# frame = varint length prefix || postcard body; see protocol/SPEC.md\n{}\n",
                to_hex(&frame)
            );
            std::fs::write(&path, text).unwrap();
        }
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (generate with FEEDSYNC_BLESS=1)", path.display()));
        let expected = from_hex(&text);
        assert_eq!(frame, expected, "{name}: encoding changed");
        assert_eq!(
            &decode_frame(&expected).unwrap(),
            msg,
            "{name}: decoding changed"
        );
        let (prefix, _) = frame_header(&expected).unwrap().unwrap();
        tags.push(expected[prefix]);
    }
    // The wire tag of each variant is its position; vectors cover every one, in order.
    assert_eq!(tags, (0..all.len() as u8).collect::<Vec<_>>());
    // The data vector's proof really verifies against the fixed key.
    let key = SigningKey::from_bytes(&[0x11; 32]);
    let mut replica =
        Feed::create_replica(MemoryStorage::new(), key.verifying_key().to_bytes()).unwrap();
    let Message::Data(d) = &all[10].2 else {
        unreachable!()
    };
    let proof = feedsync::core::Proof {
        nodes: d.nodes.clone(),
        upgrade: d.upgrade.clone(),
    };
    replica
        .verify_and_store(d.index, &[&d.blocks[0].0], &proof)
        .unwrap();
}
