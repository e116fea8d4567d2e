//! Decoding arbitrary, truncated, mutated and oversized bytes never panics, and never allocates
//! more than a bounded amount beyond the bytes that actually arrived (measured with a counting
//! allocator, not assumed).

use feedsync_protocol::*;
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts bytes allocated by the current thread, so concurrent tests do not disturb the figure.
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every method forwards to the system allocator unchanged; the only addition is
// bookkeeping in const-initialised thread-local cells, which never allocate themselves.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LIVE.try_with(|l| {
            l.set(l.get() + layout.size());
            PEAK.with(|p| p.set(p.get().max(l.get())));
        });
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(layout.size())));
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bookkeeping allowance on top of the input size: bounded element vectors (at most 1024 blocks
/// x 24 bytes, 1152 nodes x 48 bytes, 65536 runs x 8 bytes) and postcard/serde scratch.
const SLACK: usize = 1024 * 1024;

/// Decodes `body` and returns the peak bytes allocated while doing so.
fn decode_measured(body: &[u8]) -> (Result<Message, FrameError>, usize) {
    let base = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(base));
    let r = decode(body);
    let peak = PEAK.with(|p| p.get()) - base;
    (r, peak)
}

fn node() -> impl Strategy<Value = Node> {
    (any::<u64>(), any::<[u8; 32]>(), any::<u64>()).prop_map(|(index, hash, size)| Node {
        index,
        hash,
        size,
    })
}

fn block_set() -> impl Strategy<Value = BlockSet> {
    prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(start, count)| BlockSet::Range { start, count }),
        (any::<u64>(), proptest::collection::vec(any::<u64>(), 0..20))
            .prop_map(|(start, runs)| BlockSet::Runs { start, runs }),
    ]
}

fn signature() -> impl Strategy<Value = [u8; 64]> {
    proptest::collection::vec(any::<u8>(), 64).prop_map(|v| <[u8; 64]>::try_from(v).unwrap())
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u32>(), any::<u64>(), "[a-z0-9/. ]{0,40}").prop_map(|(version, features, agent)| {
            Message::Hello(Hello {
                version,
                features,
                agent,
            })
        }),
        (any::<u32>(), any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(
            |(channel, discovery_key, capability)| {
                Message::Open(Open {
                    channel,
                    discovery_key,
                    capability,
                })
            }
        ),
        any::<u32>().prop_map(|channel| Message::Close(Close { channel })),
        (any::<u32>(), any::<u64>(), any::<[u8; 32]>(), signature()).prop_map(
            |(channel, length, tree_hash, signature)| {
                Message::Status(Status {
                    channel,
                    length,
                    tree_hash,
                    signature,
                })
            }
        ),
        (any::<u32>(), block_set())
            .prop_map(|(channel, blocks)| Message::Have(Have { channel, blocks })),
        (any::<u32>(), block_set())
            .prop_map(|(channel, blocks)| Message::Unhave(Have { channel, blocks })),
        (any::<u32>(), block_set())
            .prop_map(|(channel, blocks)| Message::Want(Want { channel, blocks })),
        (any::<u32>(), block_set())
            .prop_map(|(channel, blocks)| Message::Unwant(Want { channel, blocks })),
        (
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            0..=MAX_REQUEST_BLOCKS,
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(|(channel, id, index, count, length, upgrade)| {
                Message::Request(Request {
                    channel,
                    id,
                    index,
                    count,
                    length,
                    upgrade,
                })
            }),
        (any::<u32>(), any::<u64>())
            .prop_map(|(channel, id)| Message::Cancel(Cancel { channel, id })),
        (
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..5),
            proptest::collection::vec(node(), 0..10),
            proptest::option::of((
                any::<u64>(),
                proptest::collection::vec(node(), 0..5),
                signature()
            )),
        )
            .prop_map(|(channel, id, index, blocks, nodes, upgrade)| {
                Message::Data(Data {
                    channel,
                    id,
                    index,
                    blocks: blocks.into_iter().map(Block).collect(),
                    nodes,
                    upgrade: upgrade.map(|(length, roots, signature)| Upgrade {
                        length,
                        roots,
                        signature,
                    }),
                })
            }),
        (any::<u32>(), any::<u64>())
            .prop_map(|(channel, id)| Message::NoData(NoData { channel, id })),
        any::<u64>().prop_map(|nonce| Message::Ping(Ping { nonce })),
        any::<u64>().prop_map(|nonce| Message::Pong(Ping { nonce })),
        prop_oneof![
            Just(GoodbyeReason::Shutdown),
            Just(GoodbyeReason::ProtocolError),
            Just(GoodbyeReason::BadData),
            Just(GoodbyeReason::Timeout),
            Just(GoodbyeReason::Done),
        ]
        .prop_map(|reason| Message::Goodbye(Goodbye { reason })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let (_, peak) = decode_measured(&bytes);
        prop_assert!(peak <= bytes.len() + SLACK, "allocated {peak} for {} input bytes", bytes.len());
        let _ = decode_frame(&bytes);
        let _ = frame_header(&bytes);
    }

    #[test]
    fn valid_messages_roundtrip(msg in message()) {
        let frame = encode(&msg).unwrap();
        prop_assert_eq!(decode_frame(&frame).unwrap(), msg);
    }

    /// Every truncation and a random single-byte mutation of a valid frame decode to an error or
    /// to some message, without panicking and within the allocation bound.
    #[test]
    fn mutated_frames_never_panic(msg in message(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let frame = encode(&msg).unwrap();
        for cut in 0..frame.len() {
            prop_assert!(decode_frame(&frame[..cut]).is_err());
        }
        let mut bad = frame.clone();
        let i = at.index(bad.len());
        bad[i] = byte;
        let _ = decode_frame(&bad);
        let (prefix, _) = frame_header(&frame).unwrap().unwrap();
        let (_, peak) = decode_measured(&bad[prefix..]);
        prop_assert!(peak <= bad.len() + SLACK);
    }
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// Bodies that announce enormous lengths are refused without allocating for them.
#[test]
fn announced_lengths_do_not_drive_allocation() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // Data (tag 10): channel 0, id 0, index 0, then a block count of 2^60.
        (
            "block count 2^60",
            [vec![10, 0, 0, 0], varint(1 << 60)].concat(),
        ),
        // One block announcing 2^40 bytes.
        (
            "block of 2^40 bytes",
            [vec![10, 0, 0, 0, 1], varint(1 << 40)].concat(),
        ),
        // Have (tag 4), channel 0, Runs (1), start 0, then 2^50 runs.
        ("2^50 runs", [vec![4, 0, 1, 0], varint(1 << 50)].concat()),
        // A whole frame of empty blocks: 2 MiB of 1-byte elements must not become 48 MiB of Vecs.
        ("a frame of empty blocks", {
            let n = MAX_FRAME_LEN - 8;
            let mut body = [vec![10, 0, 0, 0], varint(n as u64)].concat();
            body.resize(body.len() + n, 0);
            body
        }),
    ];
    for (what, body) in cases {
        let (r, peak) = decode_measured(&body);
        assert!(r.is_err(), "{what}: accepted");
        assert!(
            peak < 64 * 1024,
            "{what}: allocated {peak} bytes for a {}-byte body",
            body.len()
        );
    }
    // A length prefix over the limit is refused from the prefix alone.
    assert!(matches!(
        frame_header(&varint(MAX_FRAME_LEN as u64 + 1)),
        Err(FrameError::TooLong(_))
    ));
}
