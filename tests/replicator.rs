//! The replicator driven by hand, message by message: capability gating, what goes on the wire,
//! unhave, unsolicited data, idle peers and Cancel on expiry, ordered fetching and its window,
//! the upload path (`poll_upload`, `Event::Uploaded`, fresh blocks first), and `peer_proved`.

use ed25519_dalek::SigningKey;
use feedsync::core::sim::{Sim, SimConfig};
use feedsync::core::{Action, Config, Event, Feed, MemoryStorage, Replicator, crypto};
use feedsync::protocol::*;

fn writer(blocks: u64) -> Feed<MemoryStorage> {
    let mut w = Feed::create(MemoryStorage::new(), SigningKey::from_bytes(&[21u8; 32])).unwrap();
    let data: Vec<Vec<u8>> = (0..blocks).map(|i| vec![i as u8; 300]).collect();
    w.append_batch(&data).unwrap();
    w
}

fn drain(r: &mut Replicator<MemoryStorage>) -> Vec<Action> {
    std::iter::from_fn(|| r.poll_action()).collect()
}

fn sent(actions: &[Action]) -> Vec<(u64, Message)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { peer, message } => Some((*peer, message.clone())),
            _ => None,
        })
        .collect()
}

/// Encodes everything a node sent and checks that the public key never appears in it.
fn assert_key_absent(messages: &[(u64, Message)], pk: &[u8; 32]) {
    for (_, m) in messages {
        let bytes = encode(m).unwrap();
        assert!(
            !bytes.windows(32).any(|w| w == pk),
            "public key on the wire in {m:?}"
        );
    }
}

/// `peer` (which dialled us on session `hh`) opens `channel` for the feed with `pk`, with a
/// valid capability.
fn open_from(r: &mut Replicator<MemoryStorage>, peer: u64, hh: &[u8], pk: &[u8; 32], channel: u32) {
    let capability = crypto::capability(pk, hh, true);
    let discovery_key = crypto::discovery_key(pk);
    r.handle_message(
        peer,
        Message::Open(Open {
            channel,
            discovery_key,
            capability,
        }),
    );
}

/// A replicator serving `w`, with peer 7 connected to it (peer 7 dialled, on session "s").
fn serving(w: Feed<MemoryStorage>) -> Replicator<MemoryStorage> {
    let mut r = Replicator::new(Config::default());
    r.add_feed(w, false);
    r.handle_connected(7, b"s", false);
    r
}

#[test]
fn a_peer_without_the_key_learns_nothing() {
    let w = writer(10);
    let pk = w.public_key();
    let dkey = w.discovery_key();
    let mut r = Replicator::new(Config::default());
    r.add_feed(w, false);
    let mut all = Vec::new();

    // It dials us: we say hello and nothing else.
    r.handle_connected(7, b"session-7", false);
    let out = sent(&drain(&mut r));
    assert!(
        matches!(out.as_slice(), [(7, Message::Hello(_))]),
        "{out:?}"
    );
    all.extend(out);

    // It knows the discovery key (announced on the LAN) but not the key: wrong capabilities.
    let wrong = [
        [0u8; 32],
        crypto::capability(&pk, b"another session", true), // replayed from elsewhere
        crypto::capability(&pk, b"session-7", false),      // reflected: our role, not its own
        crypto::capability(&[9u8; 32], b"session-7", true), // another key
    ];
    for capability in wrong {
        r.handle_message(
            7,
            Message::Open(Open {
                channel: 0,
                discovery_key: dkey,
                capability,
            }),
        );
        // Probing the channel anyway gets nothing either.
        r.handle_message(
            7,
            Message::Request(Request {
                channel: 0,
                id: 1,
                index: 0,
                count: 1,
                length: 10,
                upgrade: true,
            }),
        );
        r.handle_message(
            7,
            Message::Want(Want {
                channel: 0,
                blocks: BlockSet::Range {
                    start: 0,
                    count: 10,
                },
            }),
        );
        assert!(!r.has_uploads());
        let out = drain(&mut r);
        assert!(out.is_empty(), "answered a peer without the key: {out:?}");
    }

    // With the right capability the channel opens and the feed is announced.
    open_from(&mut r, 7, b"session-7", &pk, 3);
    let out = sent(&drain(&mut r));
    assert!(out.iter().any(|(_, m)| matches!(m, Message::Open(_))));
    assert!(
        out.iter()
            .any(|(_, m)| matches!(m, Message::Status(Status { length: 10, .. })))
    );
    assert!(out.iter().any(|(_, m)| matches!(m, Message::Have(_))));
    all.extend(out);
    r.handle_message(
        7,
        Message::Request(Request {
            channel: 3,
            id: 2,
            index: 4,
            count: 2,
            length: 0,
            upgrade: true,
        }),
    );
    let answer = r
        .poll_upload(7)
        .expect("a request on an open channel is served");
    assert!(
        matches!(&answer[0], Message::Data(Data { index: 4, blocks, upgrade: Some(_), .. }) if blocks.len() == 2)
    );
    all.extend(answer.into_iter().map(|m| (7, m)));
    assert_key_absent(&all, &pk);
}

/// A reader connected to two fake sources, `A` (peer 1, channel 5) and `B` (peer 2, channel 9),
/// that open the channel and claim every block. Returns everything the reader sent so far; it
/// has asked one of them for an upgrade.
fn reader_and_two_sources(
    blocks: u64,
) -> (
    Replicator<MemoryStorage>,
    Feed<MemoryStorage>,
    Vec<(u64, Message)>,
) {
    let w = writer(blocks);
    let pk = w.public_key();
    let mut r = Replicator::new(Config::default());
    r.add_feed(
        Feed::create_replica(MemoryStorage::new(), pk).unwrap(),
        true,
    );
    let (length, tree_hash, signature) = w.signed_tree().unwrap();
    let mut out = Vec::new();
    for (peer, channel) in [(1u64, 5u32), (2, 9)] {
        let hh = format!("hh-{peer}");
        r.handle_connected(peer, hh.as_bytes(), true);
        let capability = crypto::capability(&pk, hh.as_bytes(), false);
        let discovery_key = w.discovery_key();
        r.handle_message(
            peer,
            Message::Open(Open {
                channel,
                discovery_key,
                capability,
            }),
        );
        r.handle_message(
            peer,
            Message::Status(Status {
                channel,
                length,
                tree_hash,
                signature,
            }),
        );
        let all = BlockSet::Range {
            start: 0,
            count: blocks,
        };
        r.handle_message(
            peer,
            Message::Have(Have {
                channel,
                blocks: all,
            }),
        );
        out.extend(sent(&drain(&mut r)));
    }
    assert_key_absent(&out, &pk);
    (r, w, out)
}

/// Answers the upgrade request found in `out` with the writer's real proof.
fn answer_upgrade(
    r: &mut Replicator<MemoryStorage>,
    w: &mut Feed<MemoryStorage>,
    out: &[(u64, Message)],
) {
    let (peer, req) = out
        .iter()
        .find_map(|(p, m)| match m {
            Message::Request(r) if r.upgrade => Some((*p, r.clone())),
            _ => None,
        })
        .expect("an upgrade request");
    let proof = w.proof(0, 0, 0, true).unwrap();
    let channel = if peer == 1 { 5 } else { 9 };
    let (nodes, upgrade) = (proof.nodes, proof.upgrade);
    r.handle_message(
        peer,
        Message::Data(Data {
            channel,
            id: req.id,
            index: 0,
            blocks: vec![],
            nodes,
            upgrade,
        }),
    );
    assert_eq!(r.feed(0).len(), w.len());
}

fn reader_with_two_sources(blocks: u64) -> (Replicator<MemoryStorage>, Feed<MemoryStorage>) {
    let (mut r, mut w, out) = reader_and_two_sources(blocks);
    answer_upgrade(&mut r, &mut w, &out);
    (r, w)
}

fn requests(r: &mut Replicator<MemoryStorage>) -> Vec<(u64, Request)> {
    sent(&drain(r))
        .into_iter()
        .filter_map(|(p, m)| match m {
            Message::Request(r) => Some((p, r)),
            _ => None,
        })
        .collect()
}

#[test]
fn unhave_is_honoured() {
    let (mut r, mut w, mut out) = reader_and_two_sources(20);
    // A no longer has blocks 0..20.
    let none = BlockSet::Range {
        start: 0,
        count: 20,
    };
    r.handle_message(
        1,
        Message::Unhave(Have {
            channel: 5,
            blocks: none,
        }),
    );
    out.extend(sent(&drain(&mut r)));
    answer_upgrade(&mut r, &mut w, &out);
    let requests = requests(&mut r);
    assert!(!requests.is_empty());
    assert!(
        requests.iter().all(|(p, _)| *p == 2),
        "asked a peer that unhad the blocks: {requests:?}"
    );
}

#[test]
fn unsolicited_data_is_ignored_and_idle_peers_are_dropped() {
    let (mut r, mut w) = reader_with_two_sources(30);
    // Every request sent, by (peer, id): its channel and the tick it went out.
    let mut asked = std::collections::BTreeMap::new();
    for (p, q) in requests(&mut r) {
        asked.insert((p, q.id), (q.channel, 0u64));
    }
    assert!(!asked.is_empty());
    // Data under a request id we never used (a valid block, even) is not stored and not punished.
    let unasked = 1;
    let proof = w.proof(unasked, 1, 30, false).unwrap();
    let block = w.get(unasked).unwrap();
    r.handle_message(
        1,
        Message::Data(Data {
            channel: 5,
            id: 999_999,
            index: unasked,
            blocks: vec![Block(block)],
            nodes: proof.nodes,
            upgrade: None,
        }),
    );
    assert!(!r.feed(0).has(unasked), "unsolicited block was stored");
    assert!(
        drain(&mut r)
            .iter()
            .all(|a| !matches!(a, Action::Disconnect { .. }))
    );
    // Neither source ever answers: each is dropped once it has been asked and has stayed silent
    // for the idle timeout (the second may be asked only after the first one's requests expire).
    let config = Config::default();
    let idle = config.idle_timeout;
    let mut dropped = Vec::new();
    let mut dropped_at = std::collections::BTreeMap::new();
    let mut cancelled = std::collections::BTreeMap::new();
    for t in (0..=idle * 2).step_by(5) {
        r.handle_tick(t);
        for a in drain(&mut r) {
            match a {
                Action::Disconnect { peer, reason } => {
                    dropped.push((peer, reason));
                    dropped_at.insert(peer, t);
                }
                Action::Send {
                    peer,
                    message: Message::Request(q),
                } => {
                    asked.insert((peer, q.id), (q.channel, t));
                }
                Action::Send {
                    peer,
                    message: Message::Cancel(c),
                } => {
                    assert!(
                        cancelled.insert((peer, c.id), (c.channel, t)).is_none(),
                        "request {} of peer {peer} withdrawn twice",
                        c.id
                    );
                }
                _ => {}
            }
        }
    }
    dropped.sort_by_key(|d| d.0);
    assert_eq!(
        dropped,
        vec![(1, GoodbyeReason::Timeout), (2, GoodbyeReason::Timeout)]
    );
    // Requests that timed out were withdrawn with Cancel along the way: every request that was
    // still unanswered longer than any request timeout before its peer was dropped got a Cancel
    // to that peer on the request's channel, and only after it had time to expire.
    let mut withdrawn = 0;
    for (&(peer, id), &(channel, sent)) in &asked {
        let gone = dropped_at[&peer];
        match cancelled.get(&(peer, id)) {
            Some(&(c_channel, at)) => {
                assert_eq!(c_channel, channel, "Cancel on the wrong channel");
                assert!(
                    at > sent + config.min_request_timeout,
                    "request {id} to {peer} withdrawn at {at}, before it could expire (sent {sent})"
                );
                withdrawn += 1;
            }
            None => assert!(
                gone <= sent + config.max_request_timeout + 5,
                "request {id} to {peer} (sent at {sent}) expired without a Cancel; peer dropped at {gone}"
            ),
        }
    }
    assert!(
        cancelled.keys().all(|k| asked.contains_key(k)),
        "a Cancel for a request never sent"
    );
    assert!(withdrawn > 0, "no expired request was withdrawn");
}

#[test]
fn ordered_mode_never_runs_far_ahead() {
    let max_ahead = 8;
    let key = SigningKey::from_bytes(&[3u8; 32]);
    let net = SimConfig {
        jitter: 3_000,
        ..SimConfig::default()
    };
    let mut sim = Sim::new(3, 5, net, |i| Config {
        ordered: i == 2,
        max_ahead,
        ..Config::default()
    });
    let mut w = Feed::create(MemoryStorage::new(), key.clone()).unwrap();
    let data: Vec<Vec<u8>> = (0..120u64).map(|i| vec![i as u8; 500]).collect();
    w.append_batch(&data).unwrap();
    sim.nodes[0].add_feed(w, false);
    for n in [1, 2] {
        sim.nodes[n].add_feed(
            Feed::create_replica(MemoryStorage::new(), key.verifying_key().to_bytes()).unwrap(),
            true,
        );
    }
    sim.mesh(&[0, 1, 2]);
    assert!(
        sim.run_until(30_000_000, |s| s.nodes[2].feed(0).len() == 120
            && s.nodes[2].is_complete(0))
    );
    let mut held = std::collections::BTreeSet::new();
    let mut reach = 0;
    for (_, node, e) in &sim.events {
        if let (2, Event::Downloaded { index, count, .. }) = (node, e) {
            let first_missing = (0..).find(|i| !held.contains(i)).unwrap();
            // The whole range, not just its first block, lies within the look-ahead window.
            let last = index + count - 1;
            assert!(
                last < first_missing + max_ahead,
                "blocks {index}..={last} fetched with block {first_missing} missing"
            );
            reach = reach.max(last + 1 - first_missing);
            held.extend(*index..index + count);
        }
    }
    assert_eq!(held.len(), 120);
    // And the window is used up to its end (a reader fetching one block at a time would pass
    // the bound above trivially).
    assert_eq!(reach, max_ahead, "the ordered window never reached its end");
}

/// The upgrade request in `out`, and who got it.
fn upgrade_request(out: &[(u64, Message)]) -> (u64, Request) {
    out.iter()
        .find_map(|(p, m)| match m {
            Message::Request(r) if r.upgrade => Some((*p, r.clone())),
            _ => None,
        })
        .expect("an upgrade request")
}

#[test]
fn a_malformed_answer_to_the_upgrade_does_not_wedge_it() {
    let (mut r, _w, out) = reader_and_two_sources(20);
    let (peer, req) = upgrade_request(&out);
    let channel = if peer == 1 { 5 } else { 9 };
    // A block where only the signed tree was asked for: a protocol error.
    let bogus = Data {
        channel,
        id: req.id,
        index: 0,
        blocks: vec![Block(vec![1])],
        nodes: vec![],
        upgrade: None,
    };
    r.handle_message(peer, Message::Data(bogus));
    let after = sent(&drain(&mut r));
    assert!(
        !r.peers().any(|p| p == peer),
        "the peer broke the protocol and stays connected"
    );
    let (other, _) = upgrade_request(&after);
    assert_ne!(other, peer, "the upgrade is asked of the other source");
}

#[test]
fn a_source_that_cannot_upgrade_us_is_not_asked_again_at_once() {
    let (mut r, _w, out) = reader_and_two_sources(20);
    let (peer, req) = upgrade_request(&out);
    let channel = if peer == 1 { 5 } else { 9 };
    r.handle_message(
        peer,
        Message::NoData(NoData {
            channel,
            id: req.id,
        }),
    );
    let (next, _) = upgrade_request(&sent(&drain(&mut r)));
    assert_ne!(next, peer, "asked the same peer again");
}

#[test]
fn a_second_channel_number_for_the_same_feed_is_refused() {
    let w = writer(4);
    let pk = w.public_key();
    let mut r = serving(w);
    for channel in [1, 2] {
        open_from(&mut r, 7, b"s", &pk, channel);
    }
    let out = drain(&mut r);
    assert!(
        out.iter().any(|a| matches!(
            a,
            Action::Disconnect {
                peer: 7,
                reason: GoodbyeReason::ProtocolError
            }
        )),
        "{out:?}"
    );
}

#[test]
fn a_large_request_is_served_one_piece_at_a_time() {
    let mut w = Feed::create(MemoryStorage::new(), SigningKey::from_bytes(&[8u8; 32])).unwrap();
    let blocks: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 65536]).collect();
    w.append_batch(&blocks).unwrap();
    let pk = w.public_key();
    let mut r = serving(w);
    open_from(&mut r, 7, b"s", &pk, 0);
    r.handle_message(
        7,
        Message::Request(Request {
            channel: 0,
            id: 1,
            index: 0,
            count: 40,
            length: 40,
            upgrade: false,
        }),
    );
    let mut served = 0u64;
    let mut pieces = 0;
    while let Some(messages) = r.poll_upload(7) {
        assert_eq!(messages.len(), 1, "one piece per pull");
        let Message::Data(d) = &messages[0] else {
            panic!("{messages:?}")
        };
        assert_eq!(d.index, served, "pieces in order");
        let bytes: usize = d.blocks.iter().map(|b| b.0.len()).sum();
        assert!(bytes <= MAX_DATA_BYTES);
        served += d.blocks.len() as u64;
        pieces += 1;
    }
    assert_eq!(
        (served, pieces),
        (40, 3),
        "40 blocks of 64 KiB in 1 MiB pieces"
    );
}

/// A reader fetching in order with a want filter (a folder wanting only its newest files'
/// blocks) asks for a wanted block however many unwanted missing blocks come before it: those
/// must not pin the ordered window behind it (this once stalled a live folder clone).
#[test]
fn ordered_fetching_with_a_want_filter_skips_unwanted_gaps() {
    let blocks = 3000;
    let (mut r, mut w, out) = reader_and_two_sources(blocks);
    r.set_ordered(0, true); // max_ahead is 1024 by default
    let mut want = feedsync::core::Bitfield::new();
    want.set(2500, true);
    want.set(2999, true);
    r.set_want(0, Some(want));
    answer_upgrade(&mut r, &mut w, &out);
    let asked: Vec<u64> = requests(&mut r)
        .iter()
        .flat_map(|(_, q)| q.index..q.index + u64::from(q.count))
        .collect();
    assert!(asked.contains(&2500), "asked for {asked:?}");
    assert!(
        asked.iter().all(|i| *i == 2500 || *i == 2999),
        "asked for unwanted blocks: {asked:?}"
    );
}

/// An `Open` for a feed we add a moment later (a folder clone learning its content key) is
/// answered when the feed arrives, even though we are not the side that opens proactively.
#[test]
fn an_open_that_came_before_the_feed_is_answered_when_it_is_added() {
    let w = writer(4);
    let pk = w.public_key();
    let mut r: Replicator<MemoryStorage> = Replicator::new(Config::default());
    r.handle_connected(7, b"s", false); // they dialled: we never open first
    drain(&mut r);
    open_from(&mut r, 7, b"s", &pk, 3);
    assert!(
        !sent(&drain(&mut r))
            .iter()
            .any(|(_, m)| matches!(m, Message::Open(_))),
        "answered an Open for a feed we do not have"
    );
    r.add_feed(
        Feed::create_replica(MemoryStorage::new(), pk).unwrap(),
        true,
    );
    let out = sent(&drain(&mut r));
    assert!(
        out.iter()
            .any(|(p, m)| *p == 7 && matches!(m, Message::Open(_))),
        "no answer once the feed was added: {out:?}"
    );
}

/// `Event::Uploaded` counts exactly the blocks handed out by `poll_upload`: one event per Data
/// piece with blocks, none for NoData, an upgrade-only answer, or a withdrawn request.
#[test]
fn uploaded_events_count_exactly_the_served_blocks() {
    let mut w = Feed::create(MemoryStorage::new(), SigningKey::from_bytes(&[9u8; 32])).unwrap();
    let blocks: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 65536]).collect();
    w.append_batch(&blocks).unwrap();
    let pk = w.public_key();
    let mut r = serving(w);
    open_from(&mut r, 7, b"s", &pk, 0);
    drain(&mut r);
    let ask = |id, index, count, upgrade| {
        Message::Request(Request {
            channel: 0,
            id,
            index,
            count,
            length: if upgrade { 0 } else { 40 },
            upgrade,
        })
    };
    r.handle_message(7, ask(1, 3, 30, false)); // 30 blocks: several pieces
    r.handle_message(7, ask(2, 0, 0, true)); // the signed tree only
    r.handle_message(7, ask(3, 50, 2, false)); // beyond the feed: NoData
    r.handle_message(7, ask(4, 35, 2, false)); // withdrawn before it is served
    r.handle_message(7, Message::Cancel(Cancel { channel: 0, id: 4 }));
    assert!(drain(&mut r).is_empty());
    let mut served = Vec::new();
    let mut events = Vec::new();
    let mut no_data = 0;
    while let Some(messages) = r.poll_upload(7) {
        for m in messages {
            match m {
                Message::Data(d) if !d.blocks.is_empty() => {
                    served.push((d.index, d.blocks.len() as u64))
                }
                Message::Data(d) => assert!(d.upgrade.is_some(), "an empty Data: {d:?}"),
                Message::NoData(_) => no_data += 1,
                other => panic!("unexpected answer {other:?}"),
            }
        }
        for a in drain(&mut r) {
            match a {
                Action::Event(Event::Uploaded {
                    peer: 7,
                    feed: 0,
                    index,
                    count,
                    ..
                }) => events.push((index, count)),
                other => panic!("unexpected action {other:?}"),
            }
        }
    }
    assert!(
        served.len() > 1,
        "the range was served in pieces: {served:?}"
    );
    assert_eq!(
        events, served,
        "one Uploaded per Data piece, with its blocks"
    );
    let total: u64 = events.iter().map(|e| e.1).sum();
    assert_eq!(
        total, 30,
        "exactly the 30 requested blocks, nothing for the others"
    );
    assert_eq!(no_data, 1);
}

/// `peer_proved` is false until a peer's *verified* status arrives (an open channel and haves
/// are not enough, a forged status does not count), and true after it, even when the peer's
/// length equals ours.
#[test]
fn peer_proved_needs_a_verified_status_even_of_our_own_length() {
    let w = writer(10);
    let pk = w.public_key();
    let (length, tree_hash, signature) = w.signed_tree().unwrap();
    let status = |signature: [u8; 64]| {
        Message::Status(Status {
            channel: 3,
            length,
            tree_hash,
            signature,
        })
    };
    for forged in [false, true] {
        // Our own copy of the same feed, as long as the peer's.
        let mut r = serving(writer(10));
        assert_eq!(r.feed(0).len(), length);
        assert!(!r.peer_proved(0), "proved before any peer spoke");
        open_from(&mut r, 7, b"s", &pk, 3);
        r.handle_message(
            7,
            Message::Have(Have {
                channel: 3,
                blocks: BlockSet::Range {
                    start: 0,
                    count: 10,
                },
            }),
        );
        drain(&mut r);
        assert!(
            !r.peer_proved(0),
            "an open channel and a have prove nothing"
        );
        let mut sig = signature;
        if forged {
            sig[0] ^= 1;
        }
        r.handle_message(7, status(sig));
        drain(&mut r);
        if forged {
            assert!(!r.peer_proved(0), "a forged status counted as proof");
            assert!(r.is_banned(7));
        } else {
            assert!(r.peer_proved(0), "a verified status of our own length");
            assert!(r.is_complete(0));
        }
    }
}

/// The seed's "blocks never uploaded to anyone first" rule spans peers inside `poll_upload`: a
/// peer asking only for copies waits while another peer waits for a fresh block, and is served
/// once nothing fresh is waiting, or once its request is older than `max_request_timeout`; a
/// copy another peer holds is declined once (`NoData`: fetch it there), and served if asked
/// again.
#[test]
fn copies_wait_for_fresh_blocks_of_other_peers_but_not_for_ever() {
    let w = writer(10);
    let pk = w.public_key();
    let mut r = serving(w);
    r.handle_connected(8, b"t", false);
    open_from(&mut r, 7, b"s", &pk, 0);
    open_from(&mut r, 8, b"t", &pk, 0);
    let ask = |id, index| {
        Message::Request(Request {
            channel: 0,
            id,
            index,
            count: 1,
            length: 10,
            upgrade: false,
        })
    };
    // Block 0 goes to peer 8 first: from then on it is a copy.
    r.handle_message(8, ask(1, 0));
    assert!(r.poll_upload(8).is_some());
    drain(&mut r);
    let data_index = |m: Option<Vec<Message>>| match m.as_deref() {
        Some([Message::Data(d)]) => Some(d.index),
        other => panic!("expected one Data, got {other:?}"),
    };
    // Peer 7 wants the copy, peer 8 a fresh block: 7 waits, 8 is served, then 7.
    r.handle_message(7, ask(2, 0));
    r.handle_message(8, ask(3, 5));
    assert_eq!(
        r.poll_upload(7),
        None,
        "a copy went out before a fresh block"
    );
    assert_eq!(data_index(r.poll_upload(8)), Some(5));
    // Peer 8 holds block 0 (we sent it): 7 is told to fetch it there (NoData), once.
    assert!(
        matches!(r.poll_upload(7).as_deref(), Some([Message::NoData(n)]) if n.id == 2),
        "a copy another peer holds was sent instead of redirected"
    );
    r.handle_message(7, ask(6, 0));
    assert_eq!(
        data_index(r.poll_upload(7)),
        Some(0),
        "asked again, the copy is served"
    );
    // A copy that has waited max_request_timeout ticks is served even with fresh blocks waiting.
    r.handle_message(7, ask(4, 0));
    r.handle_message(8, ask(5, 6));
    assert_eq!(r.poll_upload(7), None);
    r.handle_tick(Config::default().max_request_timeout);
    drain(&mut r);
    assert_eq!(
        data_index(r.poll_upload(7)),
        Some(0),
        "the copy waited for ever"
    );
    assert_eq!(data_index(r.poll_upload(8)), Some(6));
}

// Issue #10: hostile peers (no allocation sized by a peer's number, no per-message planning,
// coalesced unhaves, haves that fit a frame).

/// A reader of the writer-[21] feed with peer 1 (which dialled us on "hh-1") on channel 4.
fn reader_with_one_source() -> (Replicator<MemoryStorage>, [u8; 32]) {
    let pk = SigningKey::from_bytes(&[21u8; 32])
        .verifying_key()
        .to_bytes();
    let mut r = Replicator::new(Config::default());
    r.add_feed(
        Feed::create_replica(MemoryStorage::new(), pk).unwrap(),
        true,
    );
    r.handle_connected(1, b"hh-1", false);
    open_from(&mut r, 1, b"hh-1", &pk, 4);
    drain(&mut r);
    (r, pk)
}

#[test]
fn a_have_of_a_signed_length_of_2_pow_48_costs_one_run() {
    let (mut r, _) = reader_with_one_source();
    // The writer's key signs any length it likes: this status is valid.
    let key = SigningKey::from_bytes(&[21u8; 32]);
    let length = MAX_FEED_LENGTH;
    let tree_hash = [5u8; 32];
    let signature = crypto::sign(&key, &tree_hash, length).to_bytes();
    r.handle_message(
        1,
        Message::Status(Status {
            channel: 4,
            length,
            tree_hash,
            signature,
        }),
    );
    let all = BlockSet::Range {
        start: 0,
        count: length,
    };
    // Before the fix each of these sized a dense bitmap of 2^48 bits (32 TiB): abort.
    r.handle_message(
        1,
        Message::Have(Have {
            channel: 4,
            blocks: all.clone(),
        }),
    );
    r.handle_message(
        1,
        Message::Want(Want {
            channel: 4,
            blocks: all,
        }),
    );
    drain(&mut r);
    assert_eq!(r.footprint().peer_runs, 1);
    // Millions of single-block runs, a frame at a time, cost at most the configured cap.
    for k in 0..40u64 {
        let runs = BlockSet::Runs {
            start: k * 1_000_000,
            runs: vec![1; MAX_RUNS - 1],
        };
        r.handle_message(
            1,
            Message::Unhave(Have {
                channel: 4,
                blocks: runs,
            }),
        );
    }
    drain(&mut r);
    let held = r.footprint().peer_runs;
    assert!(
        held <= Config::default().max_peer_runs,
        "{held} runs held, cap {}",
        Config::default().max_peer_runs
    );
}

#[test]
fn pings_and_repeated_haves_plan_nothing_and_have_changes_plan_once_per_tick() {
    let (mut r, _w) = reader_with_two_sources(30);
    drain(&mut r);
    let before = r.schedule_passes();
    // One Noise frame's worth of pings: each answered, none planned.
    for nonce in 0..20_000 {
        r.handle_message(1, Message::Ping(Ping { nonce }));
    }
    let pongs = sent(&drain(&mut r))
        .iter()
        .filter(|(_, m)| matches!(m, Message::Pong(_)))
        .count();
    assert_eq!(pongs, 20_000);
    // The same have again and again changes nothing either.
    let all = BlockSet::Range {
        start: 0,
        count: 30,
    };
    for _ in 0..5_000 {
        r.handle_message(
            1,
            Message::Have(Have {
                channel: 5,
                blocks: all.clone(),
            }),
        );
    }
    drain(&mut r);
    assert_eq!(
        r.schedule_passes(),
        before,
        "messages that change nothing ran the scheduler"
    );
    // A peer toggling its haves changes state each time, but plans at most once per tick.
    let one = BlockSet::Range { start: 3, count: 1 };
    for _ in 0..5_000 {
        for m in [
            Message::Unhave(Have {
                channel: 5,
                blocks: one.clone(),
            }),
            Message::Have(Have {
                channel: 5,
                blocks: one.clone(),
            }),
        ] {
            r.handle_message(1, m);
        }
    }
    drain(&mut r);
    assert!(
        r.schedule_passes() <= before + 1,
        "{} passes for one tick of have changes",
        r.schedule_passes() - before
    );
}

#[test]
fn forgetting_blocks_one_by_one_sends_one_coalesced_unhave_per_peer() {
    let w = writer(1000);
    let pk = w.public_key();
    let mut r = serving(w);
    open_from(&mut r, 7, b"s", &pk, 3);
    r.handle_connected(8, b"t", false);
    open_from(&mut r, 8, b"t", &pk, 3);
    drain(&mut r);
    // A deleted file's blocks, given up one at a time (as the folder reader does).
    for x in 100..900 {
        r.forget(0, x..x + 1).unwrap();
    }
    let out = sent(&drain(&mut r));
    for peer in [7, 8] {
        let unhaves: Vec<&BlockSet> = out
            .iter()
            .filter_map(|(p, m)| match m {
                Message::Unhave(h) if *p == peer => Some(&h.blocks),
                _ => None,
            })
            .collect();
        assert_eq!(
            unhaves,
            vec![&BlockSet::Range {
                start: 100,
                count: 800
            }],
            "peer {peer}"
        );
    }
}

#[test]
fn a_fragmented_bitfield_is_announced_in_haves_that_fit_a_frame() {
    let key = SigningKey::from_bytes(&[21u8; 32]);
    let mut w = Feed::create(MemoryStorage::new(), key).unwrap();
    let blocks: Vec<[u8; 1]> = (0..70_000u32).map(|i| [i as u8]).collect();
    w.append_batch(&blocks).unwrap();
    let pk = w.public_key();
    let mut r = serving(w);
    // Every other block given up: 35,000 runs, more than one Have may carry.
    for x in (1..70_000).step_by(2) {
        r.forget(0, x..x + 1).unwrap();
    }
    drain(&mut r);
    open_from(&mut r, 7, b"s", &pk, 3);
    let out = sent(&drain(&mut r));
    let mut announced = Vec::new();
    for (_, m) in &out {
        if let Message::Have(h) = m {
            encode(m).expect("every Have fits a frame");
            match &h.blocks {
                BlockSet::Range { start, count } => announced.push(*start..start + count),
                BlockSet::Runs { start, runs } => {
                    let mut at = *start;
                    for (i, len) in runs.iter().enumerate() {
                        if i % 2 == 0 {
                            announced.push(at..at + len);
                        }
                        at += len;
                    }
                }
            }
        }
    }
    let held: Vec<_> = (0..70_000u64).step_by(2).map(|x| x..x + 1).collect();
    assert_eq!(
        announced, held,
        "the Haves announce exactly the held blocks"
    );
}

/// A hostile writer signs a length of 2^48 for a tree of identical blocks (every level of such a
/// tree has one hash, so any block's proof is cheap to make) and serves whichever block the
/// reader asks for: a reader scanning from its seeded offset asks for one near 2^47. Before the
/// fix the reader's own held bitfield was a flat bitmap sized by that index: abort.
#[test]
fn a_block_a_hostile_writer_proves_far_into_a_signed_length_of_2_pow_48_costs_a_page() {
    use feedsync::core::{flat, proof};
    let key = SigningKey::from_bytes(&[21u8; 32]);
    let block = vec![1u8; 10];
    let mut levels = vec![crypto::leaf(0, &block)];
    for d in 0..48u32 {
        let n = levels[d as usize];
        let left = Node {
            index: flat::index(d, 0),
            ..n
        };
        let right = Node {
            index: flat::index(d, 1),
            ..n
        };
        levels.push(crypto::parent(&left, &right));
    }
    let node = |i: u64| Node {
        index: i,
        ..levels[flat::depth(i) as usize]
    };
    let length = MAX_FEED_LENGTH;
    let roots = vec![node(flat::index(48, 0))];
    let tree_hash = crypto::tree_hash(&roots);
    let signature = crypto::sign(&key, &tree_hash, length).to_bytes();

    let (mut r, _) = reader_with_one_source();
    r.handle_message(
        1,
        Message::Status(Status {
            channel: 4,
            length,
            tree_hash,
            signature,
        }),
    );
    r.handle_message(
        1,
        Message::Have(Have {
            channel: 4,
            blocks: BlockSet::Range {
                start: 0,
                count: length,
            },
        }),
    );
    let (_, up) = upgrade_request(&sent(&drain(&mut r)));
    r.handle_message(
        1,
        Message::Data(Data {
            channel: 4,
            id: up.id,
            index: 0,
            blocks: vec![],
            nodes: vec![],
            upgrade: Some(Upgrade {
                length,
                roots,
                signature,
            }),
        }),
    );
    assert_eq!(r.feed(0).len(), length);
    let asked = requests(&mut r);
    let (_, req) = asked.first().expect("a block request").clone();
    assert!(req.index > 1 << 30, "asked near the start: {req:?}");
    // Its proof: the leaf, then every uncle the walk asks for.
    let leaf = crypto::leaf(req.index, &block);
    let mut nodes = vec![leaf];
    proof::walk::<()>(
        vec![leaf],
        length,
        |i| {
            nodes.push(node(i));
            Ok(node(i))
        },
        |_| Ok(()),
        |_| {},
    )
    .unwrap();
    r.handle_message(
        1,
        Message::Data(Data {
            channel: 4,
            id: req.id,
            index: req.index,
            blocks: vec![Block(block.clone())],
            nodes,
            upgrade: None,
        }),
    );
    drain(&mut r);
    assert!(r.feed(0).has(req.index), "the proven block was not stored");
    assert_eq!(r.feed(0).bitfield().count(), 1);
}
