//! Asking the home router to forward a port to us, so that peers elsewhere can dial us directly
//! instead of through a relay: UPnP-IGD (`igd-next`) first, then PCP with NAT-PMP as its
//! fallback (`crab_nat`), to the default gateway.
//!
//! Asked only with `--dht` (a LAN-only node has no use for an open port), once at start, with a
//! lease that is renewed while the node runs and removed on shutdown. Every step is bounded: one
//! SSDP search of [`SEARCH_TIMEOUT`], PCP/NAT-PMP requests with a few short retries, one request
//! per later step, and a node that gets no answer goes on without a mapping (announcing its own
//! port, which works when it is not behind a NAT). Requests go to the LAN's SSDP multicast group
//! and to the default gateway only.

use crab_nat::{InternetProtocol, PortMapping, PortMappingOptions, TimeoutConfig};
use igd_next::{PortMappingProtocol, SearchOptions};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::num::NonZeroU16;
use std::time::Duration;

/// How long the SSDP search for a UPnP gateway may take.
pub const SEARCH_TIMEOUT: Duration = Duration::from_secs(3);
/// The lease asked for; renewed at half of it.
pub const LEASE: Duration = Duration::from_secs(3600);
const DESCRIPTION: &str = "feedsync";
/// PCP and NAT-PMP: 250 ms, doubling, three retries (under 4 s in all, per protocol).
const PCP_TIMEOUTS: TimeoutConfig = TimeoutConfig {
    initial_timeout: Duration::from_millis(250),
    max_retries: 3,
    max_retry_timeout: Some(Duration::from_secs(2)),
};

/// A port the gateway forwards to us.
#[derive(Debug)]
pub struct Mapping {
    how: How,
    /// The port peers elsewhere dial on the gateway's external address.
    pub external_port: u16,
    /// Where the gateway forwards to.
    pub local: SocketAddr,
}

#[derive(Debug)]
enum How {
    Upnp(igd_next::Gateway),
    Pcp(PortMapping),
}

/// Why no mapping was made.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// Neither UPnP nor PCP/NAT-PMP gave a mapping.
    #[error("UPnP: {upnp}; PCP/NAT-PMP: {pcp}")]
    Neither {
        /// Why UPnP did not.
        upnp: String,
        /// Why PCP/NAT-PMP did not.
        pcp: String,
    },
    /// A renewal or removal failed.
    #[error("{0}")]
    Request(String),
}

/// Asks the gateway to forward TCP `port` (its own number if free, else any) to this host.
pub async fn map(port: u16) -> Result<Mapping, MapError> {
    let upnp = match blocking(move || map_upnp(port)).await {
        Ok(m) => return Ok(m),
        Err(e) => e.to_string(),
    };
    match map_pcp(port).await {
        Ok(m) => Ok(m),
        Err(pcp) => Err(MapError::Neither { upnp, pcp }),
    }
}

fn map_upnp(port: u16) -> Result<Mapping, String> {
    let mut options = SearchOptions::default();
    options.timeout = Some(SEARCH_TIMEOUT);
    options.single_search_timeout = Some(SEARCH_TIMEOUT);
    let gateway = igd_next::search_gateway(options).map_err(|e| format!("no gateway: {e}"))?;
    let local = SocketAddr::new(
        local_ip_towards(gateway.addr).map_err(|e| e.to_string())?,
        port,
    );
    let external_port = match add_port(&gateway, port, local) {
        Ok(()) => port,
        Err(_) => gateway
            .add_any_port(
                PortMappingProtocol::TCP,
                local,
                LEASE.as_secs() as u32,
                DESCRIPTION,
            )
            .map_err(|e| format!("refused: {e}"))?,
    };
    Ok(Mapping {
        how: How::Upnp(gateway),
        external_port,
        local,
    })
}

async fn map_pcp(port: u16) -> Result<Mapping, String> {
    let gateway = default_gateway().ok_or("no default gateway")?;
    let internal = NonZeroU16::new(port).ok_or("port 0")?;
    let client =
        local_ip_towards(SocketAddr::new(IpAddr::V4(gateway), 5351)).map_err(|e| e.to_string())?;
    let options = PortMappingOptions {
        external_port: Some(internal),
        lifetime_seconds: Some(LEASE.as_secs() as u32),
        timeout_config: Some(PCP_TIMEOUTS),
    };
    let m = PortMapping::new(
        gateway.into(),
        client,
        InternetProtocol::Tcp,
        internal,
        options,
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(Mapping {
        external_port: m.external_port().get(),
        local: SocketAddr::new(client, port),
        how: How::Pcp(m),
    })
}

impl Mapping {
    /// Which protocol made it, for the user.
    pub fn protocol(&self) -> &'static str {
        match &self.how {
            How::Upnp(_) => "UPnP",
            How::Pcp(m) => match m.mapping_type() {
                crab_nat::PortMappingType::NatPmp => "NAT-PMP",
                crab_nat::PortMappingType::Pcp { .. } => "PCP",
            },
        }
    }

    /// The gateway's external address: UPnP's answer to asking, PCP's with the mapping
    /// (NAT-PMP needs a request of its own and is not asked).
    pub async fn external_ip(&self) -> Option<IpAddr> {
        match &self.how {
            How::Upnp(g) => {
                let g = g.clone();
                blocking(move || g.get_external_ip().map_err(|e| e.to_string()))
                    .await
                    .ok()
            }
            How::Pcp(m) => match m.mapping_type() {
                crab_nat::PortMappingType::Pcp { external_ip, .. } => Some(external_ip),
                crab_nat::PortMappingType::NatPmp => None,
            },
        }
    }

    /// Asks for the lease again (call at half the lease).
    pub async fn renew(&mut self) -> Result<(), MapError> {
        match &mut self.how {
            How::Upnp(g) => {
                let (g, port, local) = (g.clone(), self.external_port, self.local);
                blocking(move || add_port(&g, port, local).map_err(|e| e.to_string())).await
            }
            How::Pcp(m) => m
                .renew()
                .await
                .map_err(|e| MapError::Request(e.to_string())),
        }
    }

    /// Removes the mapping (on shutdown): an open port nobody listens on is the user's risk.
    pub async fn remove(self) -> Result<(), MapError> {
        match self.how {
            How::Upnp(g) => {
                let port = self.external_port;
                blocking(move || {
                    g.remove_port(PortMappingProtocol::TCP, port)
                        .map_err(|e| e.to_string())
                })
                .await
            }
            How::Pcp(m) => m
                .try_drop()
                .await
                .map_err(|(e, _)| MapError::Request(e.to_string())),
        }
    }
}

/// UPnP's AddPortMapping of TCP `external` to `local`, for [`LEASE`].
fn add_port(
    g: &igd_next::Gateway,
    external: u16,
    local: SocketAddr,
) -> Result<(), igd_next::AddPortError> {
    g.add_port(
        PortMappingProtocol::TCP,
        external,
        local,
        LEASE.as_secs() as u32,
        DESCRIPTION,
    )
}

/// Runs a UPnP request (`igd-next`'s calls block) off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, MapError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(MapError::Request),
        Err(e) => Err(MapError::Request(e.to_string())),
    }
}

/// This host's address on the route to `to`, by connecting a UDP socket (no packet is sent).
fn local_ip_towards(to: SocketAddr) -> std::io::Result<IpAddr> {
    let bind: SocketAddr = match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(bind)?;
    s.connect(to)?;
    Ok(s.local_addr()?.ip())
}

/// The IPv4 default gateway, from the kernel's routing table (Linux: `/proc/net/route`; other
/// systems have no such file and get UPnP only).
fn default_gateway() -> Option<Ipv4Addr> {
    parse_default_gateway(&std::fs::read_to_string("/proc/net/route").ok()?)
}

/// The gateway of the first default route (destination 0, flag RTF_GATEWAY) in a
/// `/proc/net/route` table, whose addresses are 32-bit hex in host (little-endian) order.
fn parse_default_gateway(table: &str) -> Option<Ipv4Addr> {
    const RTF_GATEWAY: u32 = 0x2;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (dest, gw, flags) = (f.get(1)?, f.get(2)?, f.get(3)?);
        let flags = u32::from_str_radix(flags, 16).ok()?;
        if *dest != "00000000" || flags & RTF_GATEWAY == 0 {
            return None;
        }
        let gw = u32::from_str_radix(gw, 16).ok()?;
        Some(Ipv4Addr::from(gw.to_le_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_gateway_is_read_from_the_routing_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                     up0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n\
                     up0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\n";
        assert_eq!(
            parse_default_gateway(table),
            Some(Ipv4Addr::new(192, 168, 1, 1))
        );
        let none = "Iface\tDestination\tGateway\tFlags\nup0\t0001A8C0\t00000000\t0001\n";
        assert_eq!(parse_default_gateway(none), None);
        assert_eq!(parse_default_gateway("garbage"), None);
    }
}
