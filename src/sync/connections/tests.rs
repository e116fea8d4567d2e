//! Unit tests of `connections`.
use super::*;
use crate::core::pacing::{MAX_BUDGET, MIN_BUDGET};
use feedsync_protocol::{Goodbye, Ping};

struct Remote {
    rx: mpsc::Receiver<Message>,
    stats: Arc<net::ConnStats>,
    cancel: CancellationToken,
}

fn incoming(conn: ConnId, remote: u8, initiator: bool, queue: usize) -> (Incoming, Remote) {
    let (outbound, rx) = mpsc::channel(queue);
    let stats = Arc::new(net::ConnStats::default());
    let cancel = CancellationToken::new();
    let inc = Incoming {
        conn,
        remote: [remote; 32],
        initiator,
        addr: format!("127.0.0.1:{}", 1000 + conn).parse().unwrap(),
        outbound,
        stats: stats.clone(),
        cancel: cancel.clone(),
        relayed: false,
    };
    (inc, Remote { rx, stats, cancel })
}

#[test]
fn a_direct_path_replaces_a_relayed_one_on_both_ends() {
    // Whoever dialled what, both ends keep the direct connection: a relayed one never
    // replaces it and it always replaces a relayed one.
    for (our_key, direct_initiator) in [(5u8, true), (5, false), (200, true), (200, false)] {
        let mut c = Connections::new([our_key; 32], 8, Duration::from_secs(1));
        let (mut relayed, relayed_r) = incoming(1, 9, !direct_initiator, 16);
        relayed.relayed = true;
        assert!(matches!(
            c.admit(relayed, |_| true),
            Admission::Accepted { .. }
        ));
        let (direct, direct_r) = incoming(2, 9, direct_initiator, 16);
        let Admission::Accepted {
            replaced: Some(old),
            ..
        } = c.admit(direct, |_| true)
        else {
            panic!("the direct connection did not replace the relayed one");
        };
        assert_eq!(old.conn, 1);
        assert_eq!(c.conn_of(1), Some(2));
        // A later relayed one is turned away while the direct one lives.
        let (mut again, again_r) = incoming(3, 9, direct_initiator, 16);
        again.relayed = true;
        assert_eq!(c.admit(again, |_| true), Admission::Duplicate { peer: 1 });
        assert!(again_r.cancel.is_cancelled());
        assert!(!direct_r.cancel.is_cancelled());
        drop(relayed_r);
    }
}

fn ping() -> Message {
    Message::Ping(Ping { nonce: 1 })
}

#[test]
fn ourselves_and_peers_beyond_the_limit_are_refused() {
    let mut c = Connections::new([5; 32], 1, Duration::from_secs(1));
    let (me, me_r) = incoming(1, 5, true, 16);
    assert_eq!(
        c.admit(me, |_| true),
        Admission::Refused(RefuseReason::Ourselves)
    );
    assert!(me_r.cancel.is_cancelled());
    let (a, _a) = incoming(2, 7, true, 16);
    assert!(matches!(
        c.admit(a, |_| true),
        Admission::Accepted {
            peer: 1,
            replaced: None,
            evicted: None,
        }
    ));
    let (b, b_r) = incoming(3, 8, false, 16);
    assert_eq!(
        c.admit(b, |_| true),
        Admission::Refused(RefuseReason::TooManyPeers)
    );
    assert!(b_r.cancel.is_cancelled());
    // A known peer redialling at the limit replaces its old connection instead.
    let (a2, _a2) = incoming(4, 7, true, 16);
    let Admission::Accepted {
        peer: 1,
        replaced: Some(old),
        ..
    } = c.admit(a2, |_| true)
    else {
        panic!("a redial at the limit was not admitted")
    };
    assert_eq!(old.conn, 2);
    assert!(old.current);
    assert_eq!(c.len(), 1);
    assert_eq!(c.conn_of(1), Some(4));
}

#[test]
fn both_ends_keep_the_connection_dialled_by_the_smaller_key() {
    // Our key [5; 32] is smaller than the peer's [9; 32]: the connection we dialled wins,
    // whichever arrives first.
    for our_dial_first in [true, false] {
        let mut c = Connections::new([5; 32], 8, Duration::from_secs(1));
        let (ours, ours_r) = incoming(1, 9, true, 16);
        let (theirs, theirs_r) = incoming(2, 9, false, 16);
        let (first, second) = if our_dial_first {
            (ours, theirs)
        } else {
            (theirs, ours)
        };
        assert!(matches!(
            c.admit(first, |_| true),
            Admission::Accepted { .. }
        ));
        let outcome = c.admit(second, |_| true);
        assert_eq!(c.conn_of(1), Some(1), "kept the wrong connection");
        assert!(!ours_r.cancel.is_cancelled());
        assert!(theirs_r.cancel.is_cancelled());
        if our_dial_first {
            assert_eq!(outcome, Admission::Duplicate { peer: 1 });
        } else {
            let Admission::Accepted {
                replaced: Some(old),
                ..
            } = outcome
            else {
                panic!("ours did not replace theirs: {outcome:?}")
            };
            assert_eq!(old.conn, 2);
        }
    }
}

#[test]
fn a_redial_in_the_same_direction_replaces_the_old_connection() {
    let mut c = Connections::new([9; 32], 8, Duration::from_secs(1));
    let (a, a_r) = incoming(1, 5, false, 16);
    let (b, _b) = incoming(2, 5, false, 16);
    c.admit(a, |_| true);
    assert!(matches!(
        c.admit(b, |_| true),
        Admission::Accepted {
            replaced: Some(_),
            ..
        }
    ));
    assert!(a_r.cancel.is_cancelled());
    assert_eq!(c.conn_of(1), Some(2));
}

fn unhave(start: u64) -> Message {
    Message::Unhave(feedsync_protocol::Have {
        channel: 0,
        blocks: feedsync_protocol::BlockSet::Range { start, count: 1 },
    })
}

#[test]
fn a_full_queue_backlogs_and_a_backlog_past_its_byte_budget_cuts_that_connection() {
    let mut c = Connections::new([1; 32], 8, Duration::from_secs(1));
    let (a, mut a_r) = incoming(1, 2, true, CONTROL_RESERVE + 2);
    let (b, mut b_r) = incoming(2, 3, true, CONTROL_RESERVE + 2);
    c.admit(a, |_| true);
    c.admit(b, |_| true);
    assert!(c.has_room(1));
    for _ in 0..CONTROL_RESERVE + 2 {
        c.send(1, ping()).unwrap();
    }
    assert!(!c.has_room(1), "no room once the reserve is reached");
    // A mass deletion: one Unhave per block of a 1 GiB file, to a peer that is not reading
    // yet. It fits (this burst used to trip a 4,096-message limit and cut every peer).
    for i in 0..16_384 {
        c.send(1, unhave(i)).unwrap();
    }
    // A peer that keeps not reading runs out of its byte budget, and only it is cut.
    let big = Message::Data(feedsync_protocol::Data {
        channel: 0,
        id: 1,
        index: 0,
        blocks: vec![feedsync_protocol::Block(vec![0; 1 << 20])],
        nodes: Vec::new(),
        upgrade: None,
    });
    let mut cut = None;
    for _ in 0..BACKLOG_BUDGET / (1 << 20) + 1 {
        if let Err(e) = c.send(1, big.clone()) {
            cut = Some(e);
            break;
        }
    }
    assert!(
        matches!(cut, Some(DisconnectReason::Backlogged { bytes }) if bytes > BACKLOG_BUDGET),
        "{cut:?}"
    );
    // The other connection is untouched.
    assert!(c.has_room(2));
    c.send(2, ping()).unwrap();
    assert_eq!(b_r.rx.try_recv().ok(), Some(ping()));
    // Draining the queue lets the backlog move on, in order.
    while a_r.rx.try_recv().is_ok() {}
    assert!(c.flush_backlog(1));
    assert_eq!(a_r.rx.try_recv().ok(), Some(unhave(0)));
}

#[test]
fn strangers_do_not_count_against_max_peers_and_the_oldest_makes_room() {
    // max_peers 2, every admitted peer a stranger (no channel): a newcomer is always let in;
    // past MAX_STRANGERS the oldest stranger goes.
    let mut c = Connections::new([1; 32], 2, Duration::from_secs(1));
    let mut remotes = Vec::new();
    for i in 0..MAX_STRANGERS as u64 + 3 {
        let (s, r) = incoming(10 + i, 100 + i as u8, false, 16);
        let Admission::Accepted { evicted, .. } = c.admit(s, |_| false) else {
            panic!("stranger {i} refused")
        };
        if (i as usize) < MAX_STRANGERS {
            assert!(evicted.is_none());
        } else {
            assert_eq!(evicted.map(|e| e.conn), Some(10 + i - MAX_STRANGERS as u64));
        }
        remotes.push(r);
    }
    assert_eq!(c.len(), MAX_STRANGERS);
    assert!(remotes[0].cancel.is_cancelled());
    // Members (peers with a channel) are what max_peers counts.
    let member = |p: PeerId| p <= 2;
    let mut c = Connections::new([1; 32], 2, Duration::from_secs(1));
    for i in 0..2 {
        let (m, _m) = incoming(i, 50 + i as u8, true, 16);
        assert!(matches!(c.admit(m, member), Admission::Accepted { .. }));
    }
    let (late, _late) = incoming(9, 99, true, 16);
    assert_eq!(
        c.admit(late, member),
        Admission::Refused(RefuseReason::TooManyPeers)
    );
    // A stranger past its deadline is named for cutting; a member is not.
    let later = Instant::now() + Duration::from_secs(60);
    let (s, _s) = incoming(20, 77, false, 16);
    let mut c = Connections::new([1; 32], 8, Duration::from_secs(1));
    c.admit(s, |_| false);
    assert_eq!(c.strangers_since(later, |_| false), vec![20]);
    assert!(c.strangers_since(later, |_| true).is_empty());
    assert!(
        c.strangers_since(Instant::now() - Duration::from_secs(1), |_| false)
            .is_empty()
    );
}

#[test]
fn the_upload_budget_closes_the_tap() {
    let mut c = Connections::new([1; 32], 8, Duration::from_secs(1));
    let (a, a_r) = incoming(1, 2, true, 256);
    c.admit(a, |_| true);
    // A new connection has measured nothing: the smallest budget, one block.
    let min = MIN_BUDGET as usize;
    assert_eq!(c.room(1), min);
    a_r.stats.queued.store(min, Ordering::Release);
    assert!(!c.has_room(1));
    assert_eq!(c.room(1), 0);
    a_r.stats.queued.store(min - 1, Ordering::Release);
    assert!(c.has_room(1));
    assert_eq!(c.room(1), 1, "room is the budget less what is queued");
}

#[test]
fn only_a_full_connection_that_writes_nothing_is_stalled() {
    let stall = Duration::from_secs(30);
    let mut c = Connections::new([1; 32], 8, stall);
    let (a, a_r) = incoming(1, 2, true, 256);
    let (b, b_r) = incoming(2, 3, true, 256);
    c.admit(a, |_| true);
    c.admit(b, |_| true);
    a_r.stats
        .queued
        .store(MAX_BUDGET as usize, Ordering::Release);
    b_r.stats
        .queued
        .store(MAX_BUDGET as usize, Ordering::Release);
    let t0 = Instant::now();
    assert!(c.stalled(t0).is_empty());
    // b keeps writing (busy, healthy); a writes nothing.
    let mut t = t0;
    for _ in 0..4 {
        t += stall / 2;
        b_r.stats.writes.fetch_add(1, Ordering::AcqRel);
        let cut = c.stalled(t);
        if t.duration_since(t0) > stall {
            assert_eq!(cut, vec![1]);
        } else {
            assert!(cut.is_empty(), "cut before the stall timeout: {cut:?}");
        }
    }
    // Room again resets the clock (and b is still writing).
    a_r.stats.queued.store(0, Ordering::Release);
    b_r.stats.writes.fetch_add(1, Ordering::AcqRel);
    assert!(c.stalled(t + stall * 2).is_empty());
}

#[test]
fn a_peer_goodbye_is_kept_for_the_report() {
    let mut c = Connections::new([1; 32], 8, Duration::from_secs(1));
    let (a, _a) = incoming(1, 2, true, 16);
    c.admit(a, |_| true);
    c.note_goodbye(1, GoodbyeReason::Shutdown);
    let closed = c.remove(1).unwrap();
    assert_eq!(closed.goodbye, Some(GoodbyeReason::Shutdown));
    assert_eq!(
        c.send(
            1,
            Message::Goodbye(Goodbye {
                reason: GoodbyeReason::Done
            })
        ),
        Err(DisconnectReason::Closed { error: None })
    );
}
