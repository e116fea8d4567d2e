//! Discovery: LAN discovery over multicast DNS (`mdns-sd`), and, when asked for, the mainline
//! DHT ([`crate::reach::dht`]), both feeding one address book.
//!
//! Each node announces one `_feedsync._tcp.local.` service: its port, a short node id, and a
//! short tag per feed it serves, derived from the feed's *discovery key* (itself a hash of the
//! public key): a listener learns which feeds a node has only if it already holds them, and
//! never a public key. Each node also browses; a resolved service that announces a tag we also
//! have yields its addresses to dial.
//!
//! Feed tags are public: any host on the LAN can announce any address for them. What is heard
//! therefore goes into a bounded, ageing [`book::LanBook`] (capped per announcing instance, per
//! tag and in total; on-subnet addresses preferred), and the node dials only what
//! [`Discovery::poll`] hands out, never more than [`book::DIALS_IN_FLIGHT`] at once; it reports
//! each outcome back ([`Discovery::dial_failed`], [`Discovery::connected`],
//! [`Discovery::disconnected`]). A thread drains the mDNS subscription (see [`listen`]).
//!
//! Liveness is the connection's business, not mDNS's: records outlive a dead peer by minutes, so
//! a removed record does nothing here; a dial that fails backs off, and an address that keeps
//! failing or is not announced again for long is forgotten.
//!
//! Nothing here prints: a failed start is a [`DiscoveryError`], and what happens later is a
//! [`DiscoveryNote`]; the synchronizer reports both as events (discovery is a convenience; named
//! peers work without it).

pub mod book;
mod listen;

use book::{LanBook, Limits};
use mdns_sd::{IfKind, ServiceDaemon, ServiceInfo};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The DNS-SD service type.
pub const SERVICE_TYPE: &str = "_feedsync._tcp.local.";

/// Tags per TXT property (`dk0`, `dk1`, ...): a TXT string holds at most 255 bytes.
const TAGS_PER_PROPERTY: usize = 14;

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The mDNS daemon refused (no multicast-capable interface, socket errors, ...).
    #[error("mDNS: {0}")]
    Mdns(#[from] mdns_sd::Error),
    /// The browser thread could not be started.
    #[error("mDNS browser thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The DHT could not start.
    #[error(transparent)]
    Dht(#[from] crate::reach::dht::DhtError),
    /// An interface named in the allow-list could not be enabled.
    #[error("mDNS interface {name}: {source}")]
    Interface {
        /// The interface.
        name: String,
        /// Why.
        source: mdns_sd::Error,
    },
}

/// How discovery runs.
#[derive(Debug, Clone, Default)]
pub struct DiscoveryConfig {
    /// Announce and browse on the LAN over mDNS.
    pub mdns: bool,
    /// Interfaces to use for mDNS, by name (empty: all).
    pub interfaces: Vec<String>,
    /// Announce and look up over the mainline DHT (off unless asked for).
    pub dht: Option<crate::reach::dht::DhtConfig>,
}

/// The tag announced for a feed: 16 hex digits derived from its discovery key.
pub fn tag(discovery_key: &[u8; 32]) -> String {
    let h = blake3::derive_key("feedsync 2026-11 mdns feed tag", discovery_key);
    crate::util::hex(&h[..8])
}

/// Something discovery wants its owner to know, after the start. The synchronizer forwards
/// each as `NodeEvent::Discovery`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryNote {
    /// The mDNS daemon closed our subscription (it does when events pile up unread, e.g. under
    /// a flood of announcements) and browsing started again after `waited`.
    Rebrowsed {
        /// How long the closed subscription had lived.
        lived: Duration,
        /// How long we waited before subscribing again.
        waited: Duration,
    },
    /// Browsing could not start again: nothing more is discovered (announcing goes on, and
    /// named peers still work).
    Stopped {
        /// Why.
        error: String,
    },
    /// What the DHT side did.
    Dht(crate::reach::dht::DhtNote),
}

impl DiscoveryNote {
    /// Which part of discovery it is about, for the line it is printed on.
    pub fn source(&self) -> &'static str {
        match self {
            DiscoveryNote::Dht(_) => "DHT",
            _ => "LAN discovery",
        }
    }
}

impl std::fmt::Display for DiscoveryNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiscoveryNote::Rebrowsed { lived, waited } => write!(
                f,
                "the mDNS subscription was closed after {:.1}s (too many events unread); \
                 browsing again after {:.1}s",
                lived.as_secs_f64(),
                waited.as_secs_f64()
            ),
            DiscoveryNote::Stopped { error } => {
                write!(f, "browsing stopped: {error}; nothing more is discovered")
            }
            DiscoveryNote::Dht(n) => n.fmt(f),
        }
    }
}

/// What [`Discovery::poll`] gives.
#[derive(Debug, Default)]
pub struct Polled {
    /// Addresses to dial now (each counts as in flight until its outcome is reported).
    pub dial: Vec<SocketAddr>,
    /// What to tell the user.
    pub notes: Vec<DiscoveryNote>,
}

/// What the browser thread and the node share.
struct Shared {
    book: LanBook,
    notes: Vec<DiscoveryNote>,
}

/// A running announcer and browser: mDNS, the DHT, or both.
pub struct Discovery {
    mdns: Option<Mdns>,
    dht: Option<crate::reach::dht::Running>,
    shared: Arc<Mutex<Shared>>,
}

/// The mDNS side.
struct Mdns {
    daemon: ServiceDaemon,
    fullname: String,
    /// Dropped to stop the browser thread.
    stop: Option<crossbeam_channel::Sender<()>>,
    browser: Option<std::thread::JoinHandle<()>>,
}

impl Discovery {
    /// Announces `port` for `node_id` serving the feeds with `discovery_keys`, and browses, on
    /// the LAN and/or over the DHT as `config` says. The DHT side runs on `rt`.
    pub fn start(
        node_id: &[u8; 32],
        port: u16,
        discovery_keys: &[[u8; 32]],
        config: &DiscoveryConfig,
        rt: &tokio::runtime::Handle,
    ) -> Result<Self, DiscoveryError> {
        let nets = listen::local_nets();
        // Our own addresses: the DHT does not offer our own announcement back.
        let own: Vec<std::net::IpAddr> = nets.iter().map(|n| n.addr).collect();
        let shared = Arc::new(Mutex::new(Shared {
            book: LanBook::new(Limits::default(), nets),
            notes: Vec::new(),
        }));
        let mdns = match config.mdns {
            true => Some(Mdns::start(node_id, port, discovery_keys, config, &shared)?),
            false => None,
        };
        let dht = match &config.dht {
            None => None,
            Some(dc) => {
                let feeds: Vec<(String, [u8; 32])> =
                    discovery_keys.iter().map(|k| (tag(k), *k)).collect();
                let (s1, s2) = (shared.clone(), shared.clone());
                // Each announced address in a bucket of its IP's: one IP gets at most
                // `per_node` entries however often it is announced (a lying DHT node is held
                // by the lookup's per-answer cap and the per-feed cap, not by this).
                let offer: crate::reach::dht::Offer = Arc::new(move |t: &str, addrs| {
                    if let Ok(mut s) = s1.lock() {
                        let tags = BTreeSet::from([t.to_string()]);
                        for a in addrs {
                            let from = format!("dht {}", a.ip());
                            s.book.offer(&from, &tags, &[*a], Instant::now());
                        }
                    }
                });
                let notes: crate::reach::dht::Notes = Arc::new(move |n| {
                    if let Ok(mut s) = s2.lock() {
                        s.notes.push(DiscoveryNote::Dht(n));
                    }
                });
                match crate::reach::dht::start(dc, port, &feeds, own, offer, notes, rt) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        if let Some(m) = mdns {
                            m.shutdown();
                        }
                        return Err(e.into());
                    }
                }
            }
        };
        Ok(Self { mdns, dht, shared })
    }
}

impl Mdns {
    fn start(
        node_id: &[u8; 32],
        port: u16,
        discovery_keys: &[[u8; 32]],
        config: &DiscoveryConfig,
        shared: &Arc<Mutex<Shared>>,
    ) -> Result<Self, DiscoveryError> {
        let daemon = ServiceDaemon::new()?;
        if !config.interfaces.is_empty() {
            daemon.disable_interface(IfKind::All)?;
            for name in &config.interfaces {
                daemon
                    .enable_interface(IfKind::Name(name.clone()))
                    .map_err(|source| DiscoveryError::Interface {
                        name: name.clone(),
                        source,
                    })?;
            }
        }
        let id = crate::util::hex(&node_id[..8]);
        let tags: BTreeSet<String> = discovery_keys.iter().map(tag).collect();
        let list: Vec<&String> = tags.iter().collect();
        let mut props = vec![("id".to_string(), id.clone())];
        for (k, chunk) in list.chunks(TAGS_PER_PROPERTY).enumerate() {
            let joined: Vec<&str> = chunk.iter().map(|s| s.as_str()).collect();
            props.push((format!("dk{k}"), joined.join(",")));
        }
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            &format!("feedsync-{id}"),
            &format!("feedsync-{id}.local."),
            "",
            port,
            &props[..],
        )?
        .enable_addr_auto();
        let fullname = info.get_fullname().to_string();
        daemon.register(info)?;
        let events = daemon.browse(SERVICE_TYPE)?;
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let me = listen::Me {
            fullname: fullname.clone(),
            id,
            tags,
        };
        let (d, s) = (daemon.clone(), shared.clone());
        let subscribe = move || d.browse(SERVICE_TYPE).map_err(|e| e.to_string());
        let browser = std::thread::Builder::new()
            .name("feedsync-mdns".into())
            .spawn(move || listen::run(me, events, subscribe, listen::local_nets, s, stopped))
            .map_err(DiscoveryError::Thread)?;
        Ok(Self {
            daemon,
            fullname,
            stop: Some(stop),
            browser: Some(browser),
        })
    }

    /// Says goodbye (the service record is withdrawn) and stops the daemon.
    fn shutdown(mut self) {
        drop(self.stop.take());
        if let Some(t) = self.browser.take() {
            // It wakes at least every 100 ms to look at the stop channel.
            let _ = t.join();
        }
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            // Bounded wait for the goodbye packets to leave.
            let _ = rx.recv_timeout(Duration::from_millis(500));
        }
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = rx.recv_timeout(Duration::from_millis(500));
        }
    }
}

impl Discovery {
    /// What to dial now, and what to tell the user; call it every few ticks.
    pub fn poll(&mut self, now: Instant) -> Polled {
        let Ok(mut s) = self.shared.lock() else {
            return Polled::default(); // the browser thread panicked: nothing more is heard
        };
        Polled {
            dial: s.book.due(now),
            notes: std::mem::take(&mut s.notes),
        }
    }

    fn book(&self, f: impl FnOnce(&mut LanBook)) {
        if let Ok(mut s) = self.shared.lock() {
            f(&mut s.book);
        }
    }

    /// A dial to `addr` failed or its connection was turned away (a no-op for an address
    /// discovery did not hand out).
    pub fn dial_failed(&self, addr: &SocketAddr, now: Instant) {
        self.book(|b| b.failed(addr, now));
    }

    /// A dial to `addr` reached a peer we are already connected to.
    pub fn duplicate(&self, addr: &SocketAddr, now: Instant) {
        self.book(|b| b.duplicate(addr, now));
    }

    /// A dial to `addr` connected.
    pub fn connected(&self, addr: &SocketAddr, now: Instant) {
        self.book(|b| b.connected(addr, now));
    }

    /// The connection we dialled to `addr` ended.
    pub fn disconnected(&self, addr: &SocketAddr, now: Instant) {
        self.book(|b| b.disconnected(addr, now));
    }

    /// When discovery dials `addr` again, if it is one of its addresses and waiting.
    pub fn retry_in(&self, addr: &SocketAddr, now: Instant) -> Option<Duration> {
        let s = self.shared.lock().ok()?;
        s.book.retry_in(addr, now)
    }

    /// Says goodbye on the LAN, stops the DHT side and removes its port mapping.
    pub fn shutdown(self) {
        if let Some(m) = self.mdns {
            m.shutdown();
        }
        if let Some(d) = self.dht {
            d.shutdown();
        }
    }
}
