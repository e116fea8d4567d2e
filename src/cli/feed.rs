//! `feedsync feed ...`: the low-level commands on one feed store.

use crate::cli::error::{CliError, runtime, usage};
use crate::cli::folder::resolve_peers;
use feedsync::core::{Event, Feed, FeedError, crypto};
use feedsync::storage::DiskStorage;
use feedsync::sync::{NodeConfig, NodeEvent};
use feedsync::util::hex;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

fn open(store: &Path) -> Result<Feed<DiskStorage>, CliError> {
    let storage =
        DiskStorage::open(store).map_err(|e| runtime(format!("{}: {e}", store.display())))?;
    Feed::open(storage).map_err(|e| match e {
        FeedError::NotFound => usage(format!(
            "{}: holds no feed; `feedsync feed create {}` makes one",
            store.display(),
            store.display()
        )),
        e => runtime(format!("{}: {e}", store.display())),
    })
}

/// `feed create STORE`.
pub fn create(store: &Path) -> Result<(), CliError> {
    let storage =
        DiskStorage::open(store).map_err(|e| runtime(format!("{}: {e}", store.display())))?;
    let mut feed = Feed::create(storage, crypto::generate_key()).map_err(|e| match e {
        FeedError::AlreadyExists => usage(format!(
            "{}: already holds a feed; give an empty or new directory",
            store.display()
        )),
        e => runtime(format!("{}: {e}", store.display())),
    })?;
    // The key printed names a feed that exists on disk, power cut or not.
    feed.sync()?;
    writeln!(std::io::stdout(), "{}", hex(&feed.public_key()))?;
    Ok(())
}

/// `feed append STORE [FILE]`.
pub fn append(store: &Path, file: Option<PathBuf>, block_size: usize) -> Result<(), CliError> {
    if block_size == 0 || block_size > feedsync::protocol::MAX_BLOCK_LEN {
        return Err(usage(format!(
            "--block-size must be between 1 and {}",
            feedsync::protocol::MAX_BLOCK_LEN
        )));
    }
    let mut feed = open(store)?;
    let mut input: Box<dyn Read> = match file {
        Some(path) => Box::new(
            std::fs::File::open(&path).map_err(|e| usage(format!("{}: {e}", path.display())))?,
        ),
        None => Box::new(std::io::stdin().lock()),
    };
    let mut buf = vec![0u8; block_size];
    loop {
        let mut filled = 0;
        while filled < block_size {
            match input.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            break;
        }
        feed.append(&buf[..filled])?;
        if filled < block_size {
            break;
        }
    }
    feed.sync()?;
    writeln!(std::io::stdout(), "{}", feed.len())?;
    Ok(())
}

/// `feed info STORE`.
pub fn info(store: &Path) -> Result<(), CliError> {
    let feed = open(store)?;
    writeln!(
        std::io::stdout(),
        "public key:    {}",
        hex(&feed.public_key())
    )?;
    writeln!(
        std::io::stdout(),
        "discovery key: {}",
        hex(&feed.discovery_key())
    )?;
    writeln!(std::io::stdout(), "writable:      {}", feed.is_writable())?;
    writeln!(
        std::io::stdout(),
        "length:        {} blocks, {} bytes",
        feed.len(),
        feed.byte_len()
    )?;
    writeln!(
        std::io::stdout(),
        "held:          {} blocks",
        feed.bitfield().count()
    )?;
    Ok(())
}

/// `feed verify STORE`.
pub fn verify(store: &Path) -> Result<(), CliError> {
    let mut feed = open(store)?;
    feed.verify_all()
        .map_err(|e| runtime(format!("{}: verification failed: {e}", store.display())))?;
    writeln!(
        std::io::stdout(),
        "ok: {} blocks verified",
        feed.bitfield().count()
    )?;
    Ok(())
}

fn parse_key(hex: &str) -> Result<[u8; 32], CliError> {
    feedsync::util::parse_hex32(hex)
        .ok_or_else(|| usage(format!("--key: not a 64-digit hex public key: {hex}")))
}

/// `feed sync STORE`.
pub fn sync(
    store: &Path,
    key: Option<String>,
    listen: Option<SocketAddr>,
    peers: &[String],
    once: bool,
) -> Result<(), CliError> {
    let peers = resolve_peers(peers)?;
    let storage =
        || DiskStorage::open(store).map_err(|e| runtime(format!("{}: {e}", store.display())));
    let feed = match Feed::open(storage()?) {
        Ok(f) => f,
        Err(FeedError::NotFound) => {
            let key = key.ok_or_else(|| {
                usage("the store is empty: give --key to replicate a feed into it")
            })?;
            Feed::create_replica(storage()?, parse_key(&key)?)?
        }
        Err(e) => return Err(e.into()),
    };
    let download = !feed.is_writable();
    let mut held = feed.bitfield().count();
    let mut length = feed.len();
    let config = NodeConfig {
        listen,
        peers,
        exit_when_complete: once && download,
        stop: Some(crate::cli::signals::stop_channel()?),
        ..NodeConfig::new()
    };
    let node = feedsync::sync::spawn(config, vec![(feed, download)])?;
    let mut out = std::io::stdout().lock();
    let mut fetched = 0u64;
    let mut last = std::time::Instant::now() - std::time::Duration::from_secs(1);
    for event in node.events.iter() {
        match event {
            NodeEvent::Listening(addr) => writeln!(out, "listening on {addr}")?,
            NodeEvent::Replication(Event::Downloaded { count, .. }) => {
                fetched += count;
                held += count;
                if last.elapsed() >= std::time::Duration::from_millis(100) {
                    last = std::time::Instant::now();
                    writeln!(out, "progress {held} {length}")?;
                }
            }
            NodeEvent::Replication(Event::Upgraded { length: l, .. }) => length = l,
            NodeEvent::Replication(Event::Banned { peer, reason }) => {
                writeln!(out, "banned peer {peer}: {reason}")?
            }
            NodeEvent::DialFailed { addr, error, .. } => {
                eprintln!("dialling {addr}: {error}");
            }
            NodeEvent::DescriptorLimit { from, to } => {
                eprintln!("raised the open-file limit from {from} to {to}");
            }
            NodeEvent::PeerDisconnected { addr, reason, .. } => {
                eprintln!("peer {addr} left: {reason}");
            }
            NodeEvent::Complete => writeln!(out, "complete {held} {length}")?,
            NodeEvent::Stopped => break,
            _ => {}
        }
        out.flush()?;
    }
    node.join()?;
    writeln!(out, "fetched {fetched}")?;
    Ok(())
}
