//! The browser's side: a thread that drains the mDNS subscription as fast as events come,
//! hands matching announcements to the [`LanBook`], and subscribes again when the daemon
//! closes the subscription.
//!
//! Why a thread and not a poll on the node's tick: `mdns-sd` queues at most 1000 unread events
//! per subscription and *closes* it when that queue is full. Anyone on the LAN can announce a
//! few hundred services in one burst (each is a "found" and a "resolved" event), so a reader
//! that looks every 100 ms loses the subscription, and with it every later announcement. The
//! thread keeps the queue short; if it closes all the same, browsing starts again (with a
//! backoff, since a new subscription replays the daemon's cache) and the owner is told.

use super::book::LanBook;
use super::{DiscoveryNote, Shared};
use crossbeam_channel::Receiver;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long one wait for an event lasts: the longest a stop request waits for the thread.
const WAIT: Duration = Duration::from_millis(100);
/// First delay before subscribing again; doubles while subscriptions keep closing quickly.
const REBROWSE_BASE: Duration = Duration::from_millis(500);
/// Longest delay before subscribing again.
const REBROWSE_MAX: Duration = Duration::from_secs(30);
/// A subscription that lived this long resets the backoff.
const REBROWSE_CALM: Duration = Duration::from_secs(60);
/// How often this host's own networks are read again (for the subnet preference).
const NETS_EVERY: Duration = Duration::from_secs(60);
/// Notes waiting for the owner beyond this many are dropped (a stuck owner costs no memory).
pub(super) const MAX_NOTES: usize = 32;
/// Tags read from one announcement, at most (a TXT record is at most a few KiB anyway).
const MAX_TAGS: usize = 256;

/// One service instance's announcement, as far as we use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Announcement {
    /// The instance's full name (the per-node bucket).
    pub fullname: String,
    /// Its `id` property.
    pub id: Option<String>,
    /// Its feed tags.
    pub tags: BTreeSet<String>,
    /// Its addresses, with the port.
    pub addrs: Vec<SocketAddr>,
}

/// What one wait on a subscription gave.
pub(super) enum Next {
    /// An announcement resolved.
    Heard(Announcement),
    /// Some other event, or nothing within the wait.
    Nothing,
    /// The subscription is closed.
    Closed,
}

/// A subscription to announcements: `mdns-sd`'s, or a test's.
pub(super) trait Subscription: Send {
    /// Waits up to `wait` for the next event.
    fn next(&mut self, wait: Duration) -> Next;
}

impl Subscription for mdns_sd::Receiver<mdns_sd::ServiceEvent> {
    fn next(&mut self, wait: Duration) -> Next {
        match self.recv_timeout(wait) {
            Ok(mdns_sd::ServiceEvent::ServiceResolved(info)) => Next::Heard(parse(&info)),
            Ok(_) | Err(mdns_sd::RecvTimeoutError::Timeout) => Next::Nothing,
            Err(mdns_sd::RecvTimeoutError::Disconnected) => Next::Closed,
        }
    }
}

/// Reads what we use from a resolved service. Bounded: the tag list is cut at [`MAX_TAGS`].
fn parse(info: &mdns_sd::ResolvedService) -> Announcement {
    let tags = info
        .txt_properties
        .iter()
        .filter(|p| p.key().starts_with("dk"))
        .flat_map(|p| p.val_str().split(','))
        .take(MAX_TAGS)
        .map(str::to_string)
        .collect();
    let addrs = info
        .addresses
        .iter()
        .map(|ip| match ip.to_ip_addr() {
            IpAddr::V6(v6) => {
                // A link-local address needs its interface to be dialled.
                let scope = match ip {
                    mdns_sd::ScopedIp::V6(s) => s.scope_id().index,
                    _ => 0,
                };
                SocketAddr::V6(SocketAddrV6::new(v6, info.port, 0, scope))
            }
            v4 => SocketAddr::new(v4, info.port),
        })
        .collect();
    Announcement {
        fullname: info.fullname.clone(),
        id: info
            .txt_properties
            .get_property_val_str("id")
            .map(str::to_string),
        tags,
        addrs,
    }
}

/// Who we are, to skip our own announcement, and which tags we care about.
pub(super) struct Me {
    pub fullname: String,
    pub id: String,
    pub tags: BTreeSet<String>,
}

/// This host's networks, for the subnet preference (none if they cannot be read: then every
/// address ranks alike, which is what the book did before it had a preference).
pub(super) fn local_nets() -> Vec<super::book::LocalNet> {
    if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| !i.is_loopback())
        .map(|i| match i.addr {
            if_addrs::IfAddr::V4(a) => super::book::LocalNet {
                addr: IpAddr::V4(a.ip),
                netmask: IpAddr::V4(a.netmask),
            },
            if_addrs::IfAddr::V6(a) => super::book::LocalNet {
                addr: IpAddr::V6(a.ip),
                netmask: IpAddr::V6(a.netmask),
            },
        })
        .collect()
}

/// Hands `a` to the book if it is someone else's and shares a tag with us.
fn heard(me: &Me, book: &mut LanBook, a: &Announcement, now: Instant) {
    if a.fullname == me.fullname || a.id.as_deref() == Some(me.id.as_str()) {
        return; // ourselves
    }
    let shared: BTreeSet<String> = a.tags.intersection(&me.tags).cloned().collect();
    if shared.is_empty() {
        return;
    }
    book.offer(&a.fullname, &shared, &a.addrs, now);
}

fn note(shared: &Mutex<Shared>, n: DiscoveryNote) {
    if let Ok(mut s) = shared.lock()
        && s.notes.len() < MAX_NOTES
    {
        s.notes.push(n);
    }
}

/// The thread's loop: drains `sub`, subscribes again through `subscribe` when it closes, ends
/// when `stop` is dropped (or sends). `refresh_nets` reads this host's networks.
pub(super) fn run<S: Subscription>(
    me: Me,
    mut sub: S,
    mut subscribe: impl FnMut() -> Result<S, String>,
    refresh_nets: impl Fn() -> Vec<super::book::LocalNet>,
    shared: Arc<Mutex<Shared>>,
    stop: Receiver<()>,
) {
    let mut since = Instant::now();
    let mut delay = REBROWSE_BASE;
    let mut nets_at = Instant::now();
    loop {
        if !matches!(stop.try_recv(), Err(crossbeam_channel::TryRecvError::Empty)) {
            return;
        }
        match sub.next(WAIT) {
            Next::Heard(a) => {
                if let Ok(mut s) = shared.lock() {
                    heard(&me, &mut s.book, &a, Instant::now());
                }
            }
            Next::Nothing => {}
            Next::Closed => {
                let lived = since.elapsed();
                if lived >= REBROWSE_CALM {
                    delay = REBROWSE_BASE;
                }
                // A subscription that closes at once (a cache replay overflowing it again)
                // is not retried in a tight loop.
                if !matches!(
                    stop.recv_timeout(delay),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout)
                ) {
                    return;
                }
                match subscribe() {
                    Ok(s) => {
                        sub = s;
                        note(
                            &shared,
                            DiscoveryNote::Rebrowsed {
                                lived,
                                waited: delay,
                            },
                        );
                        since = Instant::now();
                        delay = (delay * 2).min(REBROWSE_MAX);
                    }
                    Err(error) => {
                        note(&shared, DiscoveryNote::Stopped { error });
                        return;
                    }
                }
            }
        }
        if nets_at.elapsed() >= NETS_EVERY {
            nets_at = Instant::now();
            let nets = refresh_nets();
            if let Ok(mut s) = shared.lock() {
                s.book.set_nets(nets);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::book::Limits;
    use super::*;

    /// A subscription fed by the test: closed when the test drops its sender.
    struct Fake(crossbeam_channel::Receiver<Announcement>);

    impl Subscription for Fake {
        fn next(&mut self, wait: Duration) -> Next {
            match self.0.recv_timeout(wait) {
                Ok(a) => Next::Heard(a),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => Next::Nothing,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Next::Closed,
            }
        }
    }

    fn announcement(name: &str, tag: &str, addr: &str) -> Announcement {
        Announcement {
            fullname: name.into(),
            id: Some(name.into()),
            tags: [tag.to_string()].into(),
            addrs: vec![addr.parse().unwrap()],
        }
    }

    fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) {
        let t = Instant::now();
        while !cond() {
            assert!(t.elapsed() < limit, "timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The daemon closed the subscription (as `mdns-sd` does when 1000 events sit unread):
    /// browsing starts again, the owner gets a note, and later announcements still arrive.
    #[test]
    fn a_closed_subscription_is_browsed_again_and_reported() {
        let me = Me {
            fullname: "me".into(),
            id: "me".into(),
            tags: ["t".to_string()].into(),
        };
        let shared = Arc::new(Mutex::new(Shared {
            book: LanBook::new(Limits::default(), Vec::new()),
            notes: Vec::new(),
        }));
        let (first_tx, first_rx) = crossbeam_channel::unbounded();
        let (second_tx, second_rx) = crossbeam_channel::unbounded();
        let mut second = Some(Fake(second_rx));
        let subscribed = Arc::new(Mutex::new(0));
        let count = subscribed.clone();
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            let subscribe = move || {
                *count.lock().unwrap() += 1;
                second.take().ok_or_else(|| "no more".to_string())
            };
            run(me, Fake(first_rx), subscribe, Vec::new, s, stop_rx);
        });
        first_tx.send(announcement("a", "t", "10.0.0.1:1")).unwrap();
        // Ourselves and strangers with no tag of ours are not kept.
        first_tx
            .send(announcement("me", "t", "10.0.0.9:1"))
            .unwrap();
        first_tx.send(announcement("b", "x", "10.0.0.8:1")).unwrap();
        drop(first_tx); // the daemon closes the subscription
        second_tx
            .send(announcement("c", "t", "10.0.0.3:1"))
            .unwrap();
        let held = |a: &str| shared.lock().unwrap().book.contains(&a.parse().unwrap());
        wait_for(Duration::from_secs(10), || held("10.0.0.3:1"));
        assert!(held("10.0.0.1:1") && !held("10.0.0.9:1") && !held("10.0.0.8:1"));
        assert_eq!(*subscribed.lock().unwrap(), 1);
        let notes = shared.lock().unwrap().notes.clone();
        assert!(
            matches!(notes.as_slice(), [DiscoveryNote::Rebrowsed { .. }]),
            "{notes:?}"
        );
        // Closing again with no subscription to be had: a note that discovery stopped, and
        // the thread ends by itself.
        drop(second_tx);
        thread.join().unwrap();
        let notes = shared.lock().unwrap().notes.clone();
        assert!(
            matches!(notes.last(), Some(DiscoveryNote::Stopped { .. })),
            "{notes:?}"
        );
        drop(stop_tx);
    }
}
