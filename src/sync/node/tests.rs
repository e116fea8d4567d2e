//! Unit tests of `node`.
use super::*;

#[test]
fn the_clock_counts_real_time_not_wakeups() {
    let t0 = Instant::now();
    let clock = Clock::new(t0, Duration::from_millis(10));
    assert_eq!(clock.ticks_at(t0), 0);
    assert_eq!(clock.ticks_at(t0 + Duration::from_millis(9)), 0);
    // A loop that woke up once in a busy second still sees 100 ticks pass.
    assert_eq!(clock.ticks_at(t0 + Duration::from_secs(1)), 100);
    assert_eq!(clock.ticks_at(t0 + Duration::from_millis(1234)), 123);
    assert_eq!(clock.duration(50), Duration::from_millis(500));
    // A zero tick length cannot divide by zero.
    let zero = Clock::new(t0, Duration::ZERO);
    assert_eq!(zero.ticks_at(t0 + Duration::from_micros(5)), 5);
}

#[test]
fn every_lost_connection_we_dialled_is_redialled() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let reasons = [
        DisconnectReason::Closed { error: None },
        DisconnectReason::Goodbye(GoodbyeReason::Shutdown),
        DisconnectReason::Stalled,
        DisconnectReason::Backlogged { bytes: 1 },
        DisconnectReason::Banned,
        DisconnectReason::ProtocolError,
        DisconnectReason::TimedOut,
        DisconnectReason::NoChannel,
    ];
    for reason in reasons {
        let mut book = PeerBook::new(BACKOFF_BASE, BACKOFF_MAX, 1);
        book.add(addr);
        book.dialing(&addr, 0);
        book.connected(&addr);
        book_after_close(&mut book, &addr, &reason, 100);
        assert!(
            book.due(100 + 2 * BACKOFF_MAX).contains(&addr),
            "never redialled after {reason}"
        );
    }
    // Our own shutdown redials nothing.
    let mut book = PeerBook::new(BACKOFF_BASE, BACKOFF_MAX, 1);
    book.add(addr);
    book.connected(&addr);
    book_after_close(&mut book, &addr, &DisconnectReason::Shutdown, 100);
    assert!(book.due(u64::MAX / 2).is_empty());
}

#[test]
fn a_taken_port_fails_at_bind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    match bind(Some(addr)) {
        Err(StartError::Listen { addr: a, source }) => {
            assert_eq!(a, addr);
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("bound a port that is taken"),
    }
}
