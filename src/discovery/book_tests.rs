//! The LAN address book without a network: caps, ageing, subnet preference, dial limit.

use super::*;

fn lan() -> Vec<LocalNet> {
    vec![LocalNet {
        addr: "10.231.0.2".parse().unwrap(),
        netmask: "255.255.255.0".parse().unwrap(),
    }]
}

fn tags(t: &[&str]) -> BTreeSet<String> {
    t.iter().map(|s| s.to_string()).collect()
}

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// `n` distinct on-subnet addresses on port `port`.
fn many(n: usize, port: u16) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| {
            SocketAddr::new(
                IpAddr::from([10, 231, 0, (i % 250 + 3) as u8]),
                port + (i / 250) as u16,
            )
        })
        .collect()
}

#[test]
fn a_flood_of_addresses_is_capped_per_node_per_tag_and_in_total() {
    let t0 = Instant::now();
    let mut book = LanBook::new(Limits::default(), lan());
    let l = Limits::default();
    // One instance announcing hundreds: it keeps `per_node`.
    let o = book.offer("evil-0", &tags(&["t"]), &many(500, 7000), t0);
    assert_eq!(o.added, l.per_node, "{o:?}");
    assert_eq!(book.len(), l.per_node);
    // Hundreds of instances for one tag: `per_tag` of them.
    for k in 0..200u16 {
        let addrs = many(4, 8000 + 10 * k);
        book.offer(&format!("evil-{}", k + 1), &tags(&["t"]), &addrs, t0);
    }
    assert_eq!(book.len(), l.per_tag);
    // Another tag fills the rest up to the total, and no further.
    for k in 0..200u16 {
        let addrs = many(4, 20000 + 10 * k);
        book.offer(&format!("other-{k}"), &tags(&["u"]), &addrs, t0);
    }
    assert_eq!(book.len(), l.total);
}

#[test]
fn unusable_addresses_are_refused() {
    let mut book = LanBook::new(Limits::default(), lan());
    let bad = [
        a("127.0.0.1:7000"),
        a("[::1]:7000"),
        a("[::ffff:127.0.0.1]:7000"),
        a("0.0.0.0:7000"),
        a("224.0.0.251:5353"),
        a("255.255.255.255:7000"),
        a("10.231.0.9:0"),
    ];
    let o = book.offer("n", &tags(&["t"]), &bad, Instant::now());
    assert_eq!((o.added, o.refused), (0, bad.len()));
    assert!(book.is_empty());
}

#[test]
fn same_subnet_addresses_are_kept_and_dialled_first() {
    let t0 = Instant::now();
    let mut book = LanBook::new(Limits::default(), lan());
    // Off-subnet first in the announcement, more of them than a node may keep.
    let mut addrs: Vec<SocketAddr> = (1..=6)
        .map(|i| SocketAddr::new(IpAddr::from([192, 0, 2, i]), 7000))
        .collect();
    addrs.push(a("10.231.0.1:7000"));
    book.offer("n", &tags(&["t"]), &addrs, t0);
    assert!(
        book.contains(&a("10.231.0.1:7000")),
        "the on-subnet one is kept"
    );
    assert_eq!(book.len(), Limits::default().per_node);
    assert_eq!(book.due(t0)[0], a("10.231.0.1:7000"), "and dialled first");

    // A full bucket of off-subnet addresses gives way to an on-subnet one.
    let limits = Limits {
        total: 4,
        ..Limits::default()
    };
    let mut book = LanBook::new(limits, lan());
    for i in 1..=4 {
        let x = SocketAddr::new(IpAddr::from([192, 0, 2, i]), 7000);
        book.offer(&format!("off{i}"), &tags(&["t"]), &[x], t0);
    }
    let o = book.offer("on", &tags(&["t"]), &[a("10.231.0.1:7000")], t0);
    assert_eq!((o.added, o.evicted), (1, 1));
    assert!(book.contains(&a("10.231.0.1:7000")));
}

#[test]
fn dials_in_flight_are_bounded_and_a_lost_report_frees_its_slot() {
    let l = Limits::default();
    let t0 = Instant::now();
    let mut book = LanBook::new(l.clone(), lan());
    for k in 0..40u16 {
        book.offer(&format!("n{k}"), &tags(&["t"]), &many(1, 7000 + k), t0);
    }
    let first = book.due(t0);
    assert_eq!(first.len(), l.in_flight);
    assert!(book.due(t0).is_empty(), "no more while those are under way");
    // One fails: one more may start.
    book.failed(&first[0], t0);
    assert_eq!(book.due(t0).len(), 1);
    assert_eq!(book.in_flight(), l.in_flight);
    // Outcomes never reported (a dial cancelled without a word): past the deadline the slots
    // come free, counted as failures.
    let later = t0 + l.dial_deadline;
    let next = book.due(later);
    assert_eq!(next.len(), l.in_flight);
    assert!(next.iter().all(|x| !first.contains(x)), "fresh ones first");
}

#[test]
fn failing_addresses_back_off_and_are_forgotten() {
    let l = Limits::default();
    let t0 = Instant::now();
    let mut book = LanBook::new(l.clone(), lan());
    let x = a("10.231.0.9:7000");
    book.offer("n", &tags(&["t"]), &[x], t0);
    let mut now = t0;
    let mut waits = Vec::new();
    for _ in 0..l.max_failures {
        assert_eq!(book.due(now), vec![x]);
        book.failed(&x, now);
        let start = now;
        while book.contains(&x) && book.due(now).is_empty() {
            now += Duration::from_millis(250);
        }
        waits.push(now - start);
        if let Some(d) = book.entries.get_mut(&x)
            && matches!(d.dial, Dial::Dialing { .. })
        {
            d.dial = Dial::Idle { next: now };
        }
    }
    assert!(
        !book.contains(&x),
        "forgotten after {} failures",
        l.max_failures
    );
    assert!(
        // The last wait is the book forgetting it, not a backoff.
        waits[..waits.len() - 1].windows(2).all(|w| w[1] > w[0]) && waits[0] >= l.backoff_base,
        "{waits:?}"
    );
}

#[test]
fn addresses_age_out_unless_announced_again_or_connected() {
    let l = Limits::default();
    let t0 = Instant::now();
    let mut book = LanBook::new(l.clone(), lan());
    let (old, fresh, up) = (a("10.231.0.7:1"), a("10.231.0.8:1"), a("10.231.0.9:1"));
    book.offer("a", &tags(&["t"]), &[old], t0);
    book.offer("b", &tags(&["t"]), &[fresh], t0);
    book.offer("c", &tags(&["t"]), &[up], t0);
    book.connected(&up, t0);
    let half = t0 + l.ttl / 2;
    book.offer("b", &tags(&["t"]), &[fresh], half);
    assert_eq!(book.expire(t0 + l.ttl), 1);
    assert!(!book.contains(&old) && book.contains(&fresh) && book.contains(&up));
    // Connected: kept past its ttl, and it outranks every newcomer in a full bucket.
    assert_eq!(book.expire(t0 + 3 * l.ttl), 1);
    assert!(book.contains(&up));
    // Once its connection ends it ages like any other.
    book.disconnected(&up, t0 + 3 * l.ttl);
    assert!(book.contains(&up));
    assert_eq!(book.expire(t0 + 4 * l.ttl), 1);
    assert!(book.is_empty());
}

#[test]
fn a_connected_address_is_never_evicted_by_a_flood() {
    let limits = Limits {
        total: 8,
        per_tag: 8,
        ..Limits::default()
    };
    let t0 = Instant::now();
    let mut book = LanBook::new(limits, lan());
    let honest = a("10.231.0.1:7000");
    book.offer("honest", &tags(&["t"]), &[honest], t0);
    assert_eq!(book.due(t0), vec![honest]);
    book.connected(&honest, t0);
    for k in 0..100u16 {
        let later = t0 + Duration::from_secs(u64::from(k) + 1);
        book.offer(
            &format!("evil{k}"),
            &tags(&["t"]),
            &many(4, 9000 + 10 * k),
            later,
        );
    }
    assert!(book.contains(&honest));
    assert_eq!(book.len(), 8);
}

#[test]
fn a_duplicate_connection_waits_long_but_is_not_a_failure() {
    let l = Limits::default();
    let t0 = Instant::now();
    let mut book = LanBook::new(l.clone(), lan());
    let x = a("10.231.0.9:7000");
    book.offer("n", &tags(&["t"]), &[x], t0);
    for k in 0..2 * l.max_failures {
        let now = t0 + l.backoff_max * k;
        assert_eq!(book.due(now), vec![x], "round {k}");
        book.duplicate(&x, now);
        assert!(book.due(now + l.backoff_max / 2).is_empty());
    }
    assert!(
        book.contains(&x),
        "kept: it answers, we just have it already"
    );
}
