//! Asking the home router to forward a port to us (UPnP-IGD, through `igd-next`), so that peers
//! elsewhere can dial us directly instead of through a relay.
//!
//! Asked only with `--dht` (a LAN-only node has no use for an open port), once at start, with a
//! lease that is renewed while the node runs and removed on shutdown. Every step is bounded: one
//! SSDP search of [`SEARCH_TIMEOUT`], one request per step, and a node that gets no answer just
//! goes on without a mapping (announcing its own port, which works when it is not behind NAT).
//! The search goes to the LAN's multicast group only; nothing is sent anywhere else.

use igd_next::{PortMappingProtocol, SearchOptions};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

/// How long the SSDP search for a gateway may take.
pub const SEARCH_TIMEOUT: Duration = Duration::from_secs(3);
/// The lease asked for; renewed at half of it.
pub const LEASE: Duration = Duration::from_secs(3600);
const DESCRIPTION: &str = "feedsync";

/// A port the gateway forwards to us.
#[derive(Debug)]
pub struct Mapping {
    gateway: igd_next::Gateway,
    /// The address peers elsewhere dial: the gateway's external address and port.
    pub external: SocketAddr,
    /// Where the gateway forwards to.
    pub local: SocketAddr,
}

/// Why no mapping was made.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// No gateway answered the search.
    #[error("no UPnP gateway answered: {0}")]
    Search(#[from] igd_next::SearchError),
    /// The gateway would not say its external address.
    #[error("the gateway did not give its external address: {0}")]
    ExternalIp(#[from] igd_next::GetExternalIpError),
    /// The gateway refused the mapping.
    #[error("the gateway refused the mapping: {0}")]
    Add(String),
    /// No local address towards the gateway.
    #[error("no local address towards the gateway: {0}")]
    Local(std::io::Error),
}

/// Finds the gateway and asks it to forward TCP `port` (its own number if free, else any) to
/// this host. Blocking, bounded by [`SEARCH_TIMEOUT`] plus one request per step.
pub fn map(port: u16) -> Result<Mapping, MapError> {
    let mut options = SearchOptions::default();
    options.timeout = Some(SEARCH_TIMEOUT);
    options.single_search_timeout = Some(SEARCH_TIMEOUT);
    let gateway = igd_next::search_gateway(options)?;
    let local = SocketAddr::new(
        local_ip_towards(gateway.addr).map_err(MapError::Local)?,
        port,
    );
    let external_ip = gateway.get_external_ip()?;
    let lease = LEASE.as_secs() as u32;
    let external_port =
        match gateway.add_port(PortMappingProtocol::TCP, port, local, lease, DESCRIPTION) {
            Ok(()) => port,
            Err(_) => gateway
                .add_any_port(PortMappingProtocol::TCP, local, lease, DESCRIPTION)
                .map_err(|e| MapError::Add(e.to_string()))?,
        };
    Ok(Mapping {
        gateway,
        external: SocketAddr::new(external_ip, external_port),
        local,
    })
}

impl Mapping {
    /// Asks for the lease again (call at half the lease).
    pub fn renew(&self) -> Result<(), MapError> {
        self.gateway
            .add_port(
                PortMappingProtocol::TCP,
                self.external.port(),
                self.local,
                LEASE.as_secs() as u32,
                DESCRIPTION,
            )
            .map_err(|e| MapError::Add(e.to_string()))
    }

    /// Removes the mapping (on shutdown): an open port nobody listens on is the user's risk.
    pub fn remove(&self) -> Result<(), String> {
        self.gateway
            .remove_port(PortMappingProtocol::TCP, self.external.port())
            .map_err(|e| e.to_string())
    }
}

/// This host's address on the route to `to`, by connecting a UDP socket (no packet is sent).
fn local_ip_towards(to: SocketAddr) -> std::io::Result<IpAddr> {
    let bind: SocketAddr = match to {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    let s = UdpSocket::bind(bind)?;
    s.connect(to)?;
    Ok(s.local_addr()?.ip())
}
