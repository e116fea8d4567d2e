//! `feedsync relay` and `feedsync dht-node`: the two services a private deployment (or a test)
//! runs for peers beyond the LAN.

use crate::cli::error::{CliError, runtime};
use feedsync::reach::relay::{RelayLimits, RelayStats};
use std::io::Write;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Runs a blind relay on `listen` until SIGINT/SIGTERM. Prints `relay listening on ADDR`, then
/// one line of counts when it stops.
pub fn relay(listen: SocketAddr, limits: RelayLimits) -> Result<(), CliError> {
    let stop = crate::cli::signals::stop_channel()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(listen))
        .map_err(|e| runtime(format!("relay: cannot listen on {listen}: {e}")))?;
    let local = listener.local_addr()?;
    // Informational: a service does not stop because nobody reads its output.
    let _ = writeln!(std::io::stdout(), "relay listening on {local}");
    let stats = Arc::new(RelayStats::default());
    let cancel = tokio_util::sync::CancellationToken::new();
    rt.spawn(feedsync::reach::relay::serve(
        listener,
        limits,
        stats.clone(),
        cancel.clone(),
    ));
    let _ = stop.recv();
    cancel.cancel();
    rt.shutdown_timeout(Duration::from_secs(1));
    let _ = writeln!(
        std::io::stdout(),
        "relay stopped: {} pairs, {} bytes forwarded, {} refused",
        stats.paired.load(Ordering::Relaxed),
        stats.forwarded.load(Ordering::Relaxed),
        stats.refused.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Runs a DHT routing node on `listen` until SIGINT/SIGTERM. Prints `dht node on ADDR`.
pub fn dht_node(listen: SocketAddrV4, bootstrap: &[String]) -> Result<(), CliError> {
    let stop = crate::cli::signals::stop_channel()?;
    feedsync::reach::dht::serve_node(listen, bootstrap, &stop, |local| {
        let _ = writeln!(std::io::stdout(), "dht node on {local}");
    })
    .map_err(|e| runtime(format!("dht node on {listen}: {e}")))
}
