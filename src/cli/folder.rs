//! `share`, `clone` and `sync`: run a folder node and tell the user what it is doing.
//!
//! The node reports typed events (peers, dials, replication) and the drive reports its own
//! (progress, versions applied, problems); this module only renders them, at a calm rate: a
//! failed dial is reported when it first fails and then at most every 30 s, "nothing yet"
//! lines back off from 10 s to a minute, and off a terminal nothing is printed per tick.

use crate::cli::args::{NetArgs, OnceArgs, PermArgs};
use crate::cli::error::{CliError, runtime, usage};
use crate::cli::render::{Reporter, bytes};
use crossbeam_channel::select;
use feedsync::core::Event;
use feedsync::drive::{Drive, DriveEvent, FolderKind};
use feedsync::sync::{Command as NodeCommand, NodeConfig, NodeEvent};
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The port a share tries first when it has never run (then the one it used last).
pub const DEFAULT_PORT: u16 = 7070;
/// Where a share remembers its port, inside its state directory.
const PORT_FILE: &str = "port";
/// A dial failing the same way is reported again after this long.
const DIAL_REPEAT: Duration = Duration::from_secs(30);
/// First and last interval of the "nothing yet" lines.
const WAITING_FIRST: Duration = Duration::from_secs(10);
const WAITING_MAX: Duration = Duration::from_secs(60);

/// `feedsync share DIR`.
pub fn share(dir: &Path, kind: Option<FolderKind>, net: &NetArgs) -> Result<(), CliError> {
    if !dir.exists() {
        return Err(usage(format!(
            "{}: no such folder; create it first or give the folder to share",
            dir.display()
        )));
    }
    if !dir.is_dir() {
        return Err(usage(format!(
            "{}: not a folder; give the folder to share",
            dir.display()
        )));
    }
    let drive = Drive::share(dir)?;
    if let Some(k) = kind {
        drive.set_kind(k)?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", drive.url())?;
    out.flush()?;
    drop(out);
    run(drive, dir, net, None, false).and_then(Ran::result)
}

/// `--umask`: set for the whole process (before any thread starts), and used for every file
/// published.
pub fn set_umask(perms: PermArgs) -> Result<(), CliError> {
    match perms.umask {
        Some(mask) => feedsync::drive::perms::set_umask(mask).map_err(|old| {
            runtime(format!(
                "--umask {mask:03o}: the umask is already fixed at {old:03o}"
            ))
        }),
        None => Ok(()),
    }
}

/// `feedsync clone URL DIR [--adopt]`.
pub fn clone(
    url: &str,
    dir: &Path,
    adopt: bool,
    net: &NetArgs,
    once: OnceArgs,
) -> Result<(), CliError> {
    let key = clone_target(url, dir)?;
    let drive = if adopt {
        Drive::clone_adopting(dir, key)
    } else {
        Drive::clone_into(dir, key)
    }
    .map_err(not_empty_is_usage)?;
    let outcome = run(drive, dir, net, once.limit(), true);
    finish_clone(dir, outcome)
}

/// `feedsync join URL DIR [--adopt]`: like `clone`, with a device of its own whose id is the
/// first line of stdout.
pub fn join(
    url: &str,
    dir: &Path,
    adopt: bool,
    kind: Option<FolderKind>,
    net: &NetArgs,
    once: OnceArgs,
) -> Result<(), CliError> {
    let key = clone_target(url, dir)?;
    let (drive, device) = Drive::join(dir, key, adopt).map_err(not_empty_is_usage)?;
    if let Some(k) = kind {
        drive.set_kind(k)?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", feedsync::util::hex(&device))?;
    out.flush()?;
    drop(out);
    let outcome = run(drive, dir, net, once.limit(), true);
    finish_clone(dir, outcome)
}

/// The folder key of `url`, once `dir` is known to be a folder or nothing yet.
fn clone_target(url: &str, dir: &Path) -> Result<[u8; 32], CliError> {
    let key = feedsync::drive::parse_url(url)
        .map_err(|e| usage(format!("{e}; give the URL that `share` printed")))?;
    if dir.exists() && !dir.is_dir() {
        return Err(usage(format!(
            "{}: is a file, not a folder; give a new or existing folder",
            dir.display()
        )));
    }
    Ok(key)
}

/// A folder that is not empty is the user's to fix in the command: another folder, or --adopt.
fn not_empty_is_usage(e: feedsync::drive::DriveError) -> CliError {
    match e {
        e @ feedsync::drive::DriveError::NotEmpty(_) => usage(e.to_string()),
        e => e.into(),
    }
}

/// `feedsync sync DIR`.
pub fn sync(
    dir: &Path,
    kind: Option<FolderKind>,
    net: &NetArgs,
    once: OnceArgs,
) -> Result<(), CliError> {
    if !dir.is_dir() {
        return Err(usage(format!(
            "{}: no such folder; `feedsync clone URL {}` makes one",
            dir.display(),
            dir.display()
        )));
    }
    let drive = Drive::open(dir)?;
    if let Some(k) = kind {
        drive.set_kind(k)?;
    }
    run(drive, dir, net, once.limit(), false).and_then(Ran::result)
}

/// A clone that failed or was interrupted before it fetched anything leaves nothing behind, so
/// a retry (with the right URL, say) starts clean. One that fetched something keeps it: the
/// next run resumes without fetching a verified block again.
fn finish_clone(dir: &Path, outcome: Result<Ran, CliError>) -> Result<(), CliError> {
    let keep = match &outcome {
        Ok(ran) => ran.fetched || (ran.finished && ran.failure.is_none()),
        Err(_) => false,
    };
    if !keep && let Ok(drive) = Drive::open(dir) {
        drive.discard()?;
    }
    outcome.and_then(Ran::result)
}

/// How a run ended.
struct Ran {
    /// Some verified metadata or content arrived (or the folder already had some).
    fetched: bool,
    /// Ended by itself (`--once` reached the newest version), not by a signal.
    finished: bool,
    /// Why `--once` gave up.
    failure: Option<String>,
}

impl Ran {
    fn result(self) -> Result<(), CliError> {
        match self.failure {
            Some(why) => Err(runtime(why)),
            None => Ok(()),
        }
    }
}

/// Resolves `--peer HOST:PORT` arguments (every address a name resolves to is dialled).
pub fn resolve_peers(peers: &[String]) -> Result<Vec<SocketAddr>, CliError> {
    resolve("--peer", peers)
}

/// Resolves `HOST:PORT` arguments of option `flag`.
pub fn resolve(flag: &str, peers: &[String]) -> Result<Vec<SocketAddr>, CliError> {
    let mut out = Vec::new();
    for p in peers {
        let addrs = p.to_socket_addrs().map_err(|e| {
            if p.rsplit_once(':').is_none() {
                usage(format!(
                    "{flag} {p}: give HOST:PORT, e.g. 192.168.1.20:7070"
                ))
            } else {
                runtime(format!("{flag} {p}: cannot resolve: {e}"))
            }
        })?;
        out.extend(addrs);
    }
    Ok(out)
}

/// Where a share listens when `--listen` is absent: the port it used last time, else 7070,
/// else any free port, on every address (IPv6 dual-stack where the host has it).
fn default_listen(state: &Path) -> SocketAddr {
    let any = feedsync::sync::any_address().ip();
    let saved = std::fs::read_to_string(state.join(PORT_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok());
    for port in saved.into_iter().chain([DEFAULT_PORT]) {
        let addr = SocketAddr::new(any, port);
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    SocketAddr::new(any, 0)
}

/// Runs a folder node until a signal, or with `once` until the folder is at the newest version
/// a peer proved (or no peer made progress for that long).
fn run(
    drive: Drive,
    dir: &Path,
    net: &NetArgs,
    once: Option<Duration>,
    fresh_clone: bool,
) -> Result<Ran, CliError> {
    let writer = drive.writer;
    let peers = resolve_peers(&net.peers)?;
    let relays = resolve("--relay", &net.relays)?;
    // Anything that finds or meets peers by itself: mDNS, the DHT, a relay.
    let discover = !net.no_discovery || net.dht || !relays.is_empty();
    let state = dir.join(feedsync::drive::STATE_DIR);
    let listen = match (net.listen, writer, discover) {
        (Some(a), _, _) => Some(a),
        (None, true, _) => Some(default_listen(&state)),
        // With discovery a clone serves too: others find it and it helps them.
        (None, false, true) => Some(feedsync::sync::any_address()),
        (None, false, false) if peers.is_empty() => {
            return Err(usage(
                "nothing to dial: give --peer HOST:PORT, --listen ADDR, --dht, --relay \
                 HOST:PORT, or drop --no-discovery",
            ));
        }
        (None, false, false) => None,
    };
    let dht = net.dht.then(|| feedsync::reach::dht::DhtConfig {
        bootstrap: net.dht_bootstrap.clone(),
        port_mapping: !net.no_port_mapping,
    });
    let reporter = Reporter::new(std::io::stderr().is_terminal());
    let (drive_tx, drive_rx) = crossbeam_channel::bounded(1024);
    let options = feedsync::drive::AppOptions {
        progress: Some(Duration::from_millis(500)),
        events: Some(drive_tx),
        ..Default::default()
    };
    let (feeds, app) = drive.into_app(options)?;
    let config = NodeConfig {
        listen,
        peers: peers.clone(),
        exit_when_complete: once.is_some() && !writer,
        stop: Some(crate::cli::signals::stop_channel()?),
        discovery: (!net.no_discovery || dht.is_some()).then(|| {
            feedsync::discovery::DiscoveryConfig {
                mdns: !net.no_discovery,
                interfaces: net.interfaces.clone(),
                dht,
            }
        }),
        relays,
        ..NodeConfig::new()
    };
    let node =
        feedsync::sync::spawn_with(config, feeds, Some(Box::new(app))).map_err(|e| match e {
            // The error names the address already; say what to do about it.
            feedsync::sync::StartError::Listen { .. } => {
                runtime(format!("{e}; pick another with --listen"))
            }
            e => e.into(),
        })?;
    if !writer && !peers.is_empty() {
        let list: Vec<String> = peers.iter().map(ToString::to_string).collect();
        reporter.line(format!("dialling {}", list.join(", ")));
    }
    let mut watch = Watch {
        writer,
        once,
        report_fetches: net.report_fetches,
        peers_named: !peers.is_empty(),
        discover,
        listening: None,
        connected: BTreeMap::new(),
        dial_errors: HashMap::new(),
        last_activity: Instant::now(),
        next_waiting: Instant::now() + WAITING_FIRST,
        waiting_gap: WAITING_FIRST,
        complete: false,
        fetched: false,
        gave_up: None,
        stats: None,
    };
    let ticker = crossbeam_channel::tick(Duration::from_secs(1));
    let mut drive_events = drive_rx.clone();
    loop {
        select! {
            recv(node.events) -> ev => match ev {
                Ok(NodeEvent::Stopped) | Err(_) => break,
                Ok(ev) => watch.node_event(ev, &reporter, &state)?,
            },
            recv(drive_events) -> ev => match ev {
                Ok(ev) => watch.drive_event(ev, &reporter),
                // The app is gone with the node; its last node events are still rendered.
                Err(_) => drive_events = crossbeam_channel::never(),
            },
            recv(ticker) -> _ => {
                if watch.tick(&reporter) {
                    let _ = node.control.send(NodeCommand::Shutdown);
                }
            },
        }
    }
    // Events the drive sent last (the final version applied, say).
    for ev in drive_rx.try_iter() {
        watch.drive_event(ev, &reporter);
    }
    reporter.finish();
    node.join()?;
    Ok(Ran {
        fetched: watch.fetched || !fresh_clone,
        finished: watch.complete,
        failure: watch.gave_up,
    })
}

/// What the CLI knows about a running node, to say what it is doing.
struct Watch {
    writer: bool,
    once: Option<Duration>,
    report_fetches: bool,
    peers_named: bool,
    discover: bool,
    listening: Option<SocketAddr>,
    connected: BTreeMap<feedsync::core::PeerId, SocketAddr>,
    /// Per dialled address: the last error and when it was printed.
    dial_errors: HashMap<SocketAddr, (String, Instant)>,
    /// A peer connected or verified data arrived.
    last_activity: Instant,
    next_waiting: Instant,
    waiting_gap: Duration,
    complete: bool,
    fetched: bool,
    /// Why `--once` gave up, once it has.
    gave_up: Option<String>,
    stats: Option<feedsync::drive::Stats>,
}

impl Watch {
    fn node_event(
        &mut self,
        ev: NodeEvent,
        reporter: &Reporter,
        state: &Path,
    ) -> Result<(), CliError> {
        let mut out = std::io::stdout().lock();
        match ev {
            NodeEvent::Listening(addr) => {
                self.listening = Some(addr);
                writeln!(out, "listening on {addr}")?;
                out.flush()?;
                if self.writer {
                    // The next run listens on the same port, so `--peer host:PORT` keeps working.
                    let _ = feedsync::util::write_atomic(
                        &state.join(PORT_FILE),
                        addr.port().to_string().as_bytes(),
                    );
                }
            }
            NodeEvent::PeerConnected {
                peer,
                addr,
                relayed,
                ..
            } => {
                self.connected.insert(peer, addr);
                self.dial_errors.remove(&addr);
                self.activity();
                match relayed {
                    true => reporter.line(format!("peer connected through relay {addr}")),
                    false => reporter.line(format!("peer {addr} connected")),
                }
            }
            NodeEvent::RelayFailed { relay, error } => {
                // A folder nobody else has would otherwise say it at every retry.
                let line = format!("no relayed connection: {error}");
                self.say_dial_error(reporter, relay, error, line);
            }
            NodeEvent::PeerDisconnected { peer, addr, reason } => {
                self.connected.remove(&peer);
                reporter.line(format!("peer {addr} left: {reason}"));
            }
            NodeEvent::DialFailed {
                addr,
                error,
                retry_in,
            } => {
                let line = format!(
                    "dialling {addr}: {error} (retrying in {}s)",
                    retry_in.as_secs().max(1)
                );
                self.say_dial_error(reporter, addr, error, line);
            }
            NodeEvent::PeerRefused { addr, reason } => {
                reporter.line(format!("turned peer {addr} away: {reason}"));
            }
            NodeEvent::DiscoveryFailed { error } => {
                reporter.line(format!("LAN discovery is off: {error}"));
            }
            NodeEvent::DescriptorLimit { from, to } => {
                reporter.line(format!("raised the open-file limit from {from} to {to}"));
            }
            NodeEvent::Discovery(note) => reporter.line(format!("{}: {note}", note.source())),
            NodeEvent::Replication(Event::Downloaded {
                feed, index, count, ..
            }) => {
                self.fetched = true;
                self.activity();
                if self.report_fetches {
                    writeln!(out, "fetched {feed} {index} {count}")?;
                    out.flush()?;
                }
            }
            NodeEvent::Replication(Event::Upgraded { .. }) => {
                self.fetched = true;
                self.activity();
            }
            NodeEvent::Replication(Event::Banned { peer, reason }) => {
                let who = self
                    .connected
                    .get(&peer)
                    .map_or_else(|| format!("#{peer}"), ToString::to_string);
                reporter.line(format!("peer {who} banned: {reason}"));
            }
            NodeEvent::Complete if !self.writer => {
                self.complete = true;
                writeln!(out, "complete")?;
                out.flush()?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Says `line` about `addr`'s failure `error`, unless the same was said within
    /// [`DIAL_REPEAT`]: a peer or relay that keeps failing the same way is named once in a
    /// while, not at every retry.
    fn say_dial_error(
        &mut self,
        reporter: &Reporter,
        addr: SocketAddr,
        error: String,
        line: String,
    ) {
        let now = Instant::now();
        let repeat = match self.dial_errors.get(&addr) {
            Some((e, at)) => *e != error || now.duration_since(*at) >= DIAL_REPEAT,
            None => true,
        };
        if repeat {
            reporter.line(line);
            self.dial_errors.insert(addr, (error, now));
        }
    }

    fn activity(&mut self) {
        self.last_activity = Instant::now();
        self.waiting_gap = WAITING_FIRST;
        self.next_waiting = self.last_activity + WAITING_FIRST;
    }

    fn drive_event(&mut self, ev: DriveEvent, reporter: &Reporter) {
        match ev {
            DriveEvent::Progress(stats) => {
                reporter.progress(&stats);
                self.stats = Some(stats);
            }
            DriveEvent::Changed {
                version,
                added,
                modified,
                removed,
            } => {
                let size = self
                    .stats
                    .as_ref()
                    .map(|s| format!(", {} in all", bytes(s.bytes_total)))
                    .unwrap_or_default();
                reporter.line(format!(
                    "version {version}: {added} added, {modified} modified, {removed} removed{size}"
                ));
            }
            DriveEvent::Skipped { path, reason } => {
                reporter.line(format!("skipping {}: {reason}", path.display()));
            }
            DriveEvent::Problem(p) => reporter.line(format!("feedsync: {p}")),
            DriveEvent::Complete { version } => {
                reporter.line(format!("up to date at version {version}"));
            }
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }

    /// Once a second: "nothing yet" lines, and the `--once` deadline. True: stop the node.
    fn tick(&mut self, reporter: &Reporter) -> bool {
        let now = Instant::now();
        if let Some(limit) = self.once
            && self.gave_up.is_none()
            && !self.complete
            && now.duration_since(self.last_activity) >= limit
        {
            let why = if self.connected.is_empty() {
                let mut why = format!("no peer reachable within {}s", limit.as_secs());
                let errors: Vec<String> = self
                    .dial_errors
                    .iter()
                    .map(|(a, (e, _))| format!("{a}: {e}"))
                    .collect();
                if !errors.is_empty() {
                    why.push_str(&format!(" ({})", errors.join("; ")));
                } else if !self.peers_named && !self.discover {
                    why.push_str(" (nothing to dial)");
                } else if !self.peers_named {
                    why.push_str(" (none found on the LAN; give --peer HOST:PORT)");
                }
                why
            } else {
                let list: Vec<String> = self.connected.values().map(ToString::to_string).collect();
                format!(
                    "no progress from a peer within {}s (connected: {}; does it serve this folder?)",
                    limit.as_secs(),
                    list.join(", ")
                )
            };
            self.gave_up = Some(why);
            return true;
        }
        if now < self.next_waiting || self.writer && self.connected.is_empty() {
            return false;
        }
        self.waiting_gap = (self.waiting_gap * 2).min(WAITING_MAX);
        self.next_waiting = now + self.waiting_gap;
        if self.connected.is_empty() {
            let line = if self.peers_named {
                "no peer connected yet; still dialling".to_string()
            } else if self.discover {
                "no peer found on the LAN yet; still looking (give --peer HOST:PORT to dial one)"
                    .to_string()
            } else {
                match self.listening {
                    Some(a) => format!("waiting for a peer to connect to {a}"),
                    None => "nothing to dial".to_string(),
                }
            };
            reporter.line(line);
        } else if !self.writer && !self.fetched {
            reporter.line("connected, but no peer has this folder yet");
        }
        false
    }
}

/// `PathBuf` of an argument made absolute for messages and the daemon.
pub fn absolute(dir: &Path) -> Result<PathBuf, CliError> {
    std::path::absolute(dir).map_err(|e| runtime(format!("{}: {e}", dir.display())))
}
