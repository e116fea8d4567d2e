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
use std::sync::Arc;
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
/// Addresses kept from one node's answer in a lookup.
pub const PER_ANSWER: usize = 16;
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
    /// Disconnects when the port-mapping task has ended (its mapping removed).
    mapper: Option<crossbeam_channel::Receiver<()>>,
}

/// How long a stop waits for the port mapping to be removed.
pub const UNMAP_WAIT: Duration = Duration::from_secs(3);

/// Starts the DHT: binds its socket now (errors surface at start), then announces and looks up
/// every `(tag, discovery key)` on `rt` until shut down. `port` is our TCP listening port;
/// `own` our addresses (our own announcement found again is not offered).
pub fn start(
    config: &DhtConfig,
    port: u16,
    feeds: &[(String, [u8; 32])],
    own: Vec<std::net::IpAddr>,
    offer: Offer,
    notes: Notes,
    rt: &tokio::runtime::Handle,
) -> Result<Running, DhtError> {
    let bootstrap = config.bootstrap_list()?;
    let mut builder = Dht::builder();
    // The UDP port: 6881 if free, else any (`mainline`'s choice).
    builder.bootstrap(&bootstrap);
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
    // What to announce: our port until a gateway forwards one (then that, and its address).
    let (mapped_tx, mapped_rx) = tokio::sync::watch::channel((port, None));
    let mut mapper = None;
    if config.port_mapping {
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
        mapper = Some(done_rx);
        rt.spawn(keep_mapped(
            port,
            mapped_tx,
            notes.clone(),
            cancel.clone(),
            done_tx,
        ));
    }
    let me = Me {
        port,
        own,
        offer,
        notes,
    };
    rt.spawn(run(dht, hashes, me, mapped_rx, cancel.clone()));
    Ok(Running { cancel, mapper })
}

impl Running {
    /// Stops announcing and looking up, and waits (at most [`UNMAP_WAIT`]) for the port
    /// mapping to be removed.
    pub fn shutdown(self) {
        self.cancel.cancel();
        if let Some(done) = self.mapper {
            let _ = done.recv_timeout(UNMAP_WAIT);
        }
    }
}

/// Who we are, for the lookup loop.
struct Me {
    port: u16,
    own: Vec<std::net::IpAddr>,
    offer: Offer,
    notes: Notes,
}

impl Me {
    /// Offers what a lookup found under `tag`, less our own addresses (our announcement comes
    /// back from every lookup); returns how many were offered.
    fn offer(&self, tag: &str, addrs: &[SocketAddr], mapped: Option<SocketAddr>) -> usize {
        let theirs: Vec<SocketAddr> = addrs
            .iter()
            .filter(|a| {
                Some(**a) != mapped && !(a.port() == self.port && self.own.contains(&a.ip()))
            })
            .copied()
            .collect();
        if !theirs.is_empty() {
            (self.offer)(tag, &theirs);
        }
        theirs.len()
    }
}

type Mapped = (u16, Option<std::net::IpAddr>);

async fn run(
    dht: Dht,
    hashes: Vec<(String, Id)>,
    me: Me,
    mut mapped_rx: tokio::sync::watch::Receiver<Mapped>,
    cancel: CancellationToken,
) {
    let dht = dht.as_async();
    // The last announcement (when, which port), and the port the user was last told of.
    let (mut announced, mut told_port, mut told_found) = (None::<(Instant, u16)>, None, false);
    let mut retry = FIRST_RETRY;
    loop {
        let (announce_port, external_ip) = *mapped_rx.borrow_and_update();
        let mapped = external_ip.map(|ip| SocketAddr::new(ip, announce_port));
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
                n = lookup(&dht, *hash, |addrs| me.offer(tag, addrs, mapped)) => n,
            };
        }
        if announce_due && announced_all {
            announced = Some((Instant::now(), announce_port));
            if told_port != Some(announce_port) {
                told_port = Some(announce_port);
                (me.notes)(DhtNote::Announced {
                    feeds: hashes.len(),
                    port: announce_port,
                });
            }
        }
        if found > 0 && !told_found {
            told_found = true;
            (me.notes)(DhtNote::Found { addrs: found });
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
            Ok(()) = mapped_rx.changed() => {}
        }
    }
}

/// Asks the gateway for a mapping of `port` (once; a node without a gateway goes on without
/// one), renews it at half its lease, and removes it when `cancel` fires, whenever that is: it
/// owns the mapping, so none is left behind by a stop that came while a request was in flight
/// (the stop waits [`UNMAP_WAIT`] for this). `done` disconnects when it ends.
async fn keep_mapped(
    port: u16,
    mapped_tx: tokio::sync::watch::Sender<Mapped>,
    notes: Notes,
    cancel: CancellationToken,
    done: crossbeam_channel::Sender<()>,
) {
    let _done = done;
    // Not raced against the stop: each request is bounded, and a mapping made must be removed.
    let m = match super::portmap::map(port).await {
        Ok(m) => m,
        Err(e) => {
            notes(DhtNote::NotMapped {
                error: e.to_string(),
            });
            return;
        }
    };
    if cancel.is_cancelled() {
        let _ = m.remove().await;
        return;
    }
    let ip = m.external_ip().await;
    notes(DhtNote::Mapped {
        ip,
        port: m.external_port,
        protocol: m.protocol(),
    });
    let _ = mapped_tx.send((m.external_port, ip));
    let mut m = m;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(super::portmap::LEASE / 2) => {}
        }
        let _ = m.renew().await;
    }
    let _ = m.remove().await;
}

/// One lookup: hands the addresses peers announced under `hash` to `found` as each node's
/// answer arrives (a peer is dialled while the query is still going), at most [`PER_LOOKUP`]
/// in all, within [`QUERY_TIMEOUT`]. Returns how many `found` took.
async fn lookup(
    dht: &mainline::async_dht::AsyncDht,
    hash: Id,
    found: impl Fn(&[SocketAddr]) -> usize,
) -> usize {
    use futures_util::StreamExt;
    let mut stream = dht.get_peers(hash);
    let mut seen: Vec<SocketAddr> = Vec::new();
    let mut taken = 0;
    let deadline = tokio::time::sleep(QUERY_TIMEOUT);
    tokio::pin!(deadline);
    while seen.len() < PER_LOOKUP {
        let next = tokio::select! {
            _ = &mut deadline => break,
            n = stream.next() => n,
        };
        let Some(batch) = next else { break };
        let before = seen.len();
        // One node's answer: a liar gets at most `PER_ANSWER` places per lookup.
        for a in batch.into_iter().take(PER_ANSWER) {
            let a = SocketAddr::V4(a);
            if seen.len() < PER_LOOKUP && !seen.contains(&a) {
                seen.push(a);
            }
        }
        if seen.len() > before {
            taken += found(&seen[before..]);
        }
    }
    taken
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
