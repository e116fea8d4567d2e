//! Nodes on loopback in one process: what a user of the events sees, start errors, the stop
//! channel and typed append errors.

use super::*;
use crate::core::crypto;
use feedsync_protocol::GoodbyeReason;
use std::time::Instant;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn writer_feed(dir: &std::path::Path) -> Feed<DiskStorage> {
    let mut feed = Feed::create(
        DiskStorage::open(dir.join("writer")).unwrap(),
        crypto::generate_key(),
    )
    .unwrap();
    feed.append(b"one block").unwrap();
    feed
}

/// The first event matching `want` within `secs` seconds (others are skipped).
fn wait_for(
    node: &NodeHandle,
    secs: u64,
    what: &str,
    want: impl Fn(&NodeEvent) -> bool,
) -> NodeEvent {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match node.events.recv_timeout(left) {
            Ok(e) if want(&e) => return e,
            Ok(_) => {}
            Err(_) => panic!("no {what} within {secs} s"),
        }
    }
}

fn listening(node: &NodeHandle) -> SocketAddr {
    match wait_for(node, 10, "listener", |e| {
        matches!(e, NodeEvent::Listening(_))
    }) {
        NodeEvent::Listening(a) => a,
        _ => unreachable!("matched above"),
    }
}

#[test]
fn a_taken_port_is_an_error_of_spawn() {
    let taken = std::net::TcpListener::bind(loopback()).unwrap();
    let addr = taken.local_addr().unwrap();
    let config = NodeConfig {
        listen: Some(addr),
        ..NodeConfig::new()
    };
    match spawn(config, Vec::new()) {
        Err(StartError::Listen { addr: a, .. }) => assert_eq!(a, addr),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("spawned on a taken port"),
    }
}

#[test]
fn a_refused_dial_says_why_and_when_it_retries() {
    let closed = std::net::TcpListener::bind(loopback()).unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let config = NodeConfig {
        peers: vec![addr],
        ..NodeConfig::new()
    };
    let node = spawn(config, Vec::new()).unwrap();
    let failed = |e: &NodeEvent| matches!(e, NodeEvent::DialFailed { .. });
    let NodeEvent::DialFailed {
        addr: a,
        error,
        retry_in,
    } = wait_for(&node, 10, "a failed dial", failed)
    else {
        unreachable!("matched above")
    };
    assert_eq!(a, addr);
    assert!(error.contains("refused"), "{error}");
    assert!(retry_in >= Duration::from_millis(500), "{retry_in:?}");
    // The next attempt backs off further, on the clock it announced.
    let t = Instant::now();
    let NodeEvent::DialFailed {
        retry_in: later, ..
    } = wait_for(&node, 10, "a second failed dial", failed)
    else {
        unreachable!("matched above")
    };
    assert!(
        t.elapsed() + Duration::from_millis(100) >= retry_in,
        "{:?} < {retry_in:?}",
        t.elapsed()
    );
    assert!(later > retry_in, "{later:?} <= {retry_in:?}");
    node.shutdown().unwrap();
}

#[test]
fn a_node_that_dials_itself_refuses_the_connection() {
    let config = NodeConfig {
        listen: Some(loopback()),
        ..NodeConfig::new()
    };
    let node = spawn(config, Vec::new()).unwrap();
    let addr = listening(&node);
    node.control.send(Command::AddPeer(addr)).unwrap();
    let e = wait_for(&node, 10, "a refusal", |e| {
        matches!(e, NodeEvent::PeerRefused { .. })
    });
    assert!(
        matches!(
            e,
            NodeEvent::PeerRefused {
                reason: RefuseReason::Ourselves,
                ..
            }
        ),
        "{e:?}"
    );
    node.shutdown().unwrap();
}

#[test]
fn peers_see_who_connected_and_why_they_left() {
    let dir = tempfile::tempdir().unwrap();
    let feed = writer_feed(dir.path());
    let key = feed.public_key();
    let (stop, stop_rx) = crossbeam_channel::bounded(1);
    let w = spawn(
        NodeConfig {
            listen: Some(loopback()),
            stop: Some(stop_rx),
            ..NodeConfig::new()
        },
        vec![(feed, false)],
    )
    .unwrap();
    let waddr = listening(&w);
    let replica =
        Feed::create_replica(DiskStorage::open(dir.path().join("r")).unwrap(), key).unwrap();
    let r = spawn(
        NodeConfig {
            peers: vec![waddr],
            ..NodeConfig::new()
        },
        vec![(replica, true)],
    )
    .unwrap();
    let e = wait_for(&r, 10, "connected", |e| {
        matches!(e, NodeEvent::PeerConnected { .. })
    });
    assert!(
        matches!(e, NodeEvent::PeerConnected { addr, initiator: true, .. } if addr == waddr),
        "{e:?}"
    );
    let e = wait_for(&w, 10, "connected", |e| {
        matches!(e, NodeEvent::PeerConnected { .. })
    });
    assert!(
        matches!(
            e,
            NodeEvent::PeerConnected {
                initiator: false,
                ..
            }
        ),
        "{e:?}"
    );
    wait_for(&r, 10, "complete", |e| *e == NodeEvent::Complete);

    // The stop channel starts the ordered shutdown: the reader hears the writer's goodbye.
    stop.send(()).unwrap();
    let e = wait_for(&w, 10, "the writer's own report", |e| {
        matches!(e, NodeEvent::PeerDisconnected { .. })
    });
    assert!(
        matches!(
            e,
            NodeEvent::PeerDisconnected {
                reason: DisconnectReason::Shutdown,
                ..
            }
        ),
        "{e:?}"
    );
    wait_for(&w, 10, "stopped", |e| *e == NodeEvent::Stopped);
    let e = wait_for(&r, 10, "disconnected", |e| {
        matches!(e, NodeEvent::PeerDisconnected { .. })
    });
    assert!(
        matches!(e, NodeEvent::PeerDisconnected { addr, reason: DisconnectReason::Goodbye(GoodbyeReason::Shutdown), .. } if addr == waddr),
        "{e:?}"
    );
    // A stopped node refuses appends with a typed error.
    assert!(matches!(
        w.append(0, vec![b"x".to_vec()]),
        Err(AppendError::Stopped)
    ));
    w.join().unwrap();
    r.shutdown().unwrap();
}

#[test]
fn appends_fail_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let node = spawn(NodeConfig::new(), vec![(writer_feed(dir.path()), false)]).unwrap();
    assert_eq!(node.append(0, vec![b"two".to_vec()]).unwrap(), 2);
    assert!(matches!(
        node.append(7, vec![b"x".to_vec()]),
        Err(AppendError::NoSuchFeed(7))
    ));
    node.shutdown().unwrap();
}
