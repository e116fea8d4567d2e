//! Finding peers over the BitTorrent mainline DHT (BEP 5, through the `mainline` crate).
//!
//! A node announces, for every feed it serves, its TCP port under the feed's info-hash
//! ([`super::info_hash`], never the public key nor the discovery key), and looks up the same
//! hashes for peers. What it finds goes into discovery's address book exactly like what mDNS
//! hears (`discovery::book`: capped per source address, per feed and in all, aged, dialled a few
//! at a time), so a DHT full of lies costs a bounded number of failed dials.
//!
//! **Bounded.** Every query is one `mainline` iterative query (which ends by itself) under
//! [`QUERY_TIMEOUT`]; a lookup keeps at most [`PER_LOOKUP`] addresses; rounds are at least
//! [`FIRST_RETRY`] apart, back off to [`RETRY_MAX`] while nothing is found, and run every
//! [`LOOKUP_EVERY`] once peers are found; announcements are renewed every [`ANNOUNCE_EVERY`].
//!
//! **Bootstrap.** Off by default. When on, the node joins the network through the bootstrap
//! nodes it is given; with none, through the public ones ([`PUBLIC_BOOTSTRAP`]). Tests and
//! benchmarks always give their private list, and set [`PRIVATE_ONLY_ENV`], under which a node
//! refuses to start with the public list: a test that forgot its list fails instead of reaching
//! the internet.

use mainline::{Dht, Id};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The public bootstrap nodes: used only when no list is given, never in tests.
pub const PUBLIC_BOOTSTRAP: [&str; 4] = mainline::DEFAULT_BOOTSTRAP_NODES;
/// Set (to anything) to make starting the DHT with the public bootstrap nodes an error.
pub const PRIVATE_ONLY_ENV: &str = "FEEDSYNC_DHT_PRIVATE_ONLY";
/// One announce or lookup query at most.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(20);
/// Addresses kept from one lookup.
pub const PER_LOOKUP: usize = 64;
/// First wait between rounds while nothing is found; doubles up to [`RETRY_MAX`].
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between rounds while nothing is found.
pub const RETRY_MAX: Duration = Duration::from_secs(120);
/// Wait between rounds once peers are found.
pub const LOOKUP_EVERY: Duration = Duration::from_secs(300);
/// Announcements are renewed this often (BEP 5 nodes forget peers after about 30 minutes).
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(15 * 60);

/// How the DHT runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DhtConfig {
    /// Bootstrap nodes, `HOST:PORT`. Empty: [`PUBLIC_BOOTSTRAP`].
    pub bootstrap: Vec<String>,
    /// The DHT's UDP port (`None`: 6881 if free, else any).
    pub port: Option<u16>,
    /// Ask the gateway to forward our TCP port (UPnP) and announce the forwarded one.
    pub port_mapping: bool,
}

impl DhtConfig {
    /// The bootstrap list this config starts with: its own, or the public one unless
    /// [`PRIVATE_ONLY_ENV`] is set.
    pub fn bootstrap_list(&self) -> Result<Vec<String>, DhtError> {
        if !self.bootstrap.is_empty() {
            return Ok(self.bootstrap.clone());
        }
        if std::env::var_os(PRIVATE_ONLY_ENV).is_some() {
            return Err(DhtError::PublicRefused);
        }
        Ok(PUBLIC_BOOTSTRAP.iter().map(|s| s.to_string()).collect())
    }
}

/// Why the DHT could not start.
#[derive(Debug, thiserror::Error)]
pub enum DhtError {
    /// The UDP socket could not be bound.
    #[error("DHT socket: {0}")]
    Bind(#[from] std::io::Error),
    /// No bootstrap list was given and the public one is forbidden here.
    #[error("no --dht-bootstrap given and {PRIVATE_ONLY_ENV} forbids the public bootstrap nodes")]
    PublicRefused,
}

/// What the DHT side wants its owner to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhtNote {
    /// Started: the UDP port and the bootstrap nodes used.
    Started {
        /// The DHT's UDP port.
        port: u16,
        /// The bootstrap nodes, as given.
        bootstrap: Vec<String>,
    },
    /// The gateway forwards a port to us.
    Mapped {
        /// Its external address, when it said.
        ip: Option<std::net::IpAddr>,
        /// The port others dial.
        port: u16,
        /// UPnP, PCP or NAT-PMP.
        protocol: &'static str,
    },
    /// No port mapping (the node goes on without one).
    NotMapped {
        /// Why.
        error: String,
    },
    /// Every feed announced (the first time only).
    Announced {
        /// Feeds announced.
        feeds: usize,
        /// The TCP port announced.
        port: u16,
    },
    /// Addresses found for our feeds (the first time only).
    Found {
        /// How many.
        addrs: usize,
    },
}

impl std::fmt::Display for DhtNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DhtNote::Started { port, bootstrap } => {
                write!(f, "on UDP port {port}, bootstrap {}", bootstrap.join(" "))
            }
            DhtNote::Mapped {
                ip: Some(ip),
                port,
                protocol,
            } => write!(f, "the gateway forwards {ip}:{port} to us ({protocol})"),
            DhtNote::Mapped {
                ip: None,
                port,
                protocol,
            } => write!(f, "the gateway forwards its port {port} to us ({protocol})"),
            DhtNote::NotMapped { error } => write!(f, "no port mapping: {error}"),
            DhtNote::Announced { feeds, port } => {
                write!(f, "announced {feeds} feed(s) on TCP port {port}")
            }
            DhtNote::Found { addrs } => write!(f, "found {addrs} address(es) for our feeds"),
        }
    }
}

/// Where found addresses go: (feed tag, addresses). Discovery's book.
pub type Offer = Arc<dyn Fn(&str, &[SocketAddr]) + Send + Sync>;
/// Where notes go.
pub type Notes = Arc<dyn Fn(DhtNote) + Send + Sync>;

/// A running DHT side: stopped by [`Running::shutdown`].
pub struct Running {
    cancel: CancellationToken,
    mapping: Arc<Mutex<Option<super::portmap::Mapping>>>,
    rt: tokio::runtime::Handle,
}

/// Starts the DHT: binds its socket now (errors surface at start), then announces and looks up
/// every `(tag, discovery key)` on `rt` until shut down. `port` is our TCP listening port.
pub fn start(
    config: &DhtConfig,
    port: u16,
    feeds: &[(String, [u8; 32])],
    offer: Offer,
    notes: Notes,
    rt: &tokio::runtime::Handle,
) -> Result<Running, DhtError> {
    let bootstrap = config.bootstrap_list()?;
    let mut builder = Dht::builder();
    builder.bootstrap(&bootstrap);
    if let Some(p) = config.port {
        builder.port(p);
    }
    let dht = builder.build()?;
    // The synchronous call: this runs on the node's thread, outside the runtime.
    #[allow(deprecated)]
    let udp = dht.info().local_addr().port();
    notes(DhtNote::Started {
        port: udp,
        bootstrap,
    });
    let hashes: Vec<(String, Id)> = feeds
        .iter()
        .map(|(tag, dk)| {
            let id = Id::from_bytes(super::info_hash(dk)).expect("20 bytes is an id");
            (tag.clone(), id)
        })
        .collect();
    let cancel = CancellationToken::new();
    let mapping = Arc::new(Mutex::new(None));
    rt.spawn(run(
        dht,
        hashes,
        port,
        config.port_mapping,
        offer,
        notes,
        mapping.clone(),
        cancel.clone(),
    ));
    Ok(Running {
        cancel,
        mapping,
        rt: rt.clone(),
    })
}

impl Running {
    /// Stops announcing and looking up, and removes the port mapping (bounded: two seconds).
    pub fn shutdown(self) {
        self.cancel.cancel();
        let taken = self.mapping.lock().ok().and_then(|mut m| m.take());
        if let Some(m) = taken {
            let (tx, rx) = crossbeam_channel::bounded(1);
            self.rt.spawn(async move {
                let _ = tx.send(m.remove().await);
            });
            let _ = rx.recv_timeout(Duration::from_secs(2));
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    dht: Dht,
    hashes: Vec<(String, Id)>,
    port: u16,
    port_mapping: bool,
    offer: Offer,
    notes: Notes,
    mapping: Arc<Mutex<Option<super::portmap::Mapping>>>,
    cancel: CancellationToken,
) {
    let dht = dht.as_async();
    // The port to announce: ours, until the gateway forwards one (asked for alongside, so a
    // network without a gateway does not delay the first announcement).
    let (port_tx, mut port_rx) = tokio::sync::watch::channel(port);
    if port_mapping {
        tokio::spawn(keep_mapped(
            port,
            port_tx,
            notes.clone(),
            mapping,
            cancel.clone(),
        ));
    }
    let (mut announced, mut told_announced, mut told_found) =
        (None::<(Instant, u16)>, false, false);
    let mut retry = FIRST_RETRY;
    loop {
        let announce_port = *port_rx.borrow_and_update();
        let announce_due =
            announced.is_none_or(|(t, p)| t.elapsed() >= ANNOUNCE_EVERY || p != announce_port);
        let (mut announced_all, mut found) = (true, 0usize);
        for (tag, hash) in &hashes {
            if announce_due {
                let put = dht.announce_peer(*hash, Some(announce_port));
                let ok = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = tokio::time::timeout(QUERY_TIMEOUT, put) => matches!(r, Ok(Ok(_))),
                };
                announced_all &= ok;
            }
            found += tokio::select! {
                _ = cancel.cancelled() => return,
                n = lookup(&dht, *hash, |addrs| offer(tag, addrs)) => n,
            };
        }
        if announce_due && announced_all {
            announced = Some((Instant::now(), announce_port));
            if !told_announced || announce_port != port {
                told_announced = true;
                notes(DhtNote::Announced {
                    feeds: hashes.len(),
                    port: announce_port,
                });
            }
        }
        if found > 0 && !told_found {
            told_found = true;
            notes(DhtNote::Found { addrs: found });
        }
        // Found and announced: the next round is a refresh. Otherwise retry soon, then less.
        let wait = if found > 0 && announced_all {
            retry = FIRST_RETRY;
            LOOKUP_EVERY
        } else {
            let w = retry;
            retry = (retry * 2).min(RETRY_MAX);
            w
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            // A new mapping is announced at once.
            Ok(()) = port_rx.changed() => {}
        }
    }
}

/// Asks the gateway for a mapping of `port` (once; a node without a gateway goes on without
/// one) and renews it at half its lease; the external port goes out on `port_tx`.
async fn keep_mapped(
    port: u16,
    port_tx: tokio::sync::watch::Sender<u16>,
    notes: Notes,
    slot: Arc<Mutex<Option<super::portmap::Mapping>>>,
    cancel: CancellationToken,
) {
    let mapped = tokio::select! {
        _ = cancel.cancelled() => return,
        m = super::portmap::map(port) => m,
    };
    let m = match mapped {
        Ok(m) => m,
        Err(e) => {
            notes(DhtNote::NotMapped {
                error: e.to_string(),
            });
            return;
        }
    };
    let external = m.external_port;
    // UPnP says its external address only when asked, with a blocking request.
    let ip = match super::portmap::ExternalIp::of(&m) {
        Some(probe) => tokio::task::spawn_blocking(move || probe.ask())
            .await
            .ok()
            .flatten(),
        None => m.external_ip(),
    };
    notes(DhtNote::Mapped {
        ip,
        port: external,
        protocol: m.protocol(),
    });
    if let Ok(mut s) = slot.lock() {
        *s = Some(m);
    }
    // Shut down meanwhile: `Running::shutdown` may have looked before the slot was filled.
    if cancel.is_cancelled() {
        if let Some(m) = slot.lock().ok().and_then(|mut s| s.take()) {
            let _ = m.remove().await;
        }
        return;
    }
    let _ = port_tx.send(external);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(super::portmap::LEASE / 2) => {}
        }
        // Out of the slot while it is renewed (the lock is not held across the request); a
        // shutdown meanwhile finds the slot empty and this task removes it instead.
        let Some(mut m) = slot.lock().ok().and_then(|mut s| s.take()) else {
            return;
        };
        let _ = m.renew().await;
        if cancel.is_cancelled() {
            let _ = m.remove().await;
            return;
        }
        if let Ok(mut s) = slot.lock() {
            *s = Some(m);
        }
    }
}

/// One lookup: hands the addresses peers announced under `hash` to `found` as each node's
/// answer arrives (a peer is dialled while the query is still going), at most [`PER_LOOKUP`]
/// in all, within [`QUERY_TIMEOUT`]. Returns how many it handed over.
async fn lookup(
    dht: &mainline::async_dht::AsyncDht,
    hash: Id,
    found: impl Fn(&[SocketAddr]),
) -> usize {
    use futures_util::StreamExt;
    let mut stream = dht.get_peers(hash);
    let mut seen: Vec<SocketAddr> = Vec::new();
    let deadline = tokio::time::sleep(QUERY_TIMEOUT);
    tokio::pin!(deadline);
    while seen.len() < PER_LOOKUP {
        let next = tokio::select! {
            _ = &mut deadline => break,
            n = stream.next() => n,
        };
        let Some(batch) = next else { break };
        let before = seen.len();
        for a in batch.into_iter().take(PER_LOOKUP) {
            let a = SocketAddr::V4(a);
            if seen.len() < PER_LOOKUP && !seen.contains(&a) {
                seen.push(a);
            }
        }
        if seen.len() > before {
            found(&seen[before..]);
        }
    }
    seen.len()
}

/// Runs a DHT routing node (server mode) on `bind` until `stop` says so: `feedsync dht-node`,
/// for a private DHT (an organisation's, or a test's). `bootstrap` empty: the first node of a
/// new network.
pub fn serve_node(
    bind: SocketAddrV4,
    bootstrap: &[String],
    stop: &crossbeam_channel::Receiver<()>,
    ready: impl FnOnce(SocketAddrV4),
) -> Result<(), DhtError> {
    let mut builder = Dht::builder();
    builder
        .server_mode()
        .bind_address(*bind.ip())
        .port(bind.port());
    if bootstrap.is_empty() {
        builder.no_bootstrap();
    } else {
        builder.bootstrap(bootstrap);
    }
    let dht = builder.build()?;
    #[allow(deprecated)] // a plain thread: the synchronous call is the right one
    let local = dht.info().local_addr();
    ready(local);
    let _ = stop.recv();
    drop(dht);
    Ok(())
}
