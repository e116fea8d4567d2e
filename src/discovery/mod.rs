//! LAN discovery over multicast DNS (`mdns-sd`).
//!
//! Each node announces one `_feedsync._tcp.local.` service: its port, a short node id, and a
//! short tag per feed it serves, derived from the feed's *discovery key* (itself a hash of the
//! public key): a listener learns which feeds a node has only if it already holds them, and
//! never a public key. Each node also browses; a resolved service that announces a tag we also
//! have yields its addresses to dial (the synchronizer's peer book adds the backoff).
//!
//! Liveness is the connection's business, not mDNS's: records outlive a dead peer by minutes, so
//! a removed or stale record does nothing here; a dial that fails backs off.
//!
//! Nothing here prints: a failed start is a [`DiscoveryError`], which the synchronizer reports as
//! an event (discovery is a convenience; named peers work without it).

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};

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
    /// Interfaces to use, by name (empty: all).
    pub interfaces: Vec<String>,
}

/// The tag announced for a feed: 16 hex digits derived from its discovery key.
pub fn tag(discovery_key: &[u8; 32]) -> String {
    let h = blake3::derive_key("feedsync 2026-11 mdns feed tag", discovery_key);
    h[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A running announcer and browser.
pub struct Discovery {
    daemon: ServiceDaemon,
    fullname: String,
    id: String,
    tags: BTreeSet<String>,
    events: mdns_sd::Receiver<ServiceEvent>,
}

impl Discovery {
    /// Announces `port` for `node_id` serving the feeds with `discovery_keys`, and browses.
    pub fn start(
        node_id: &[u8; 32],
        port: u16,
        discovery_keys: &[[u8; 32]],
        config: &DiscoveryConfig,
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
        let id: String = node_id[..8].iter().map(|b| format!("{b:02x}")).collect();
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
        Ok(Self {
            daemon,
            fullname,
            id,
            tags,
            events,
        })
    }

    /// Addresses of peers resolved since the last call that announce a feed we have.
    pub fn poll(&mut self) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        while let Ok(ev) = self.events.try_recv() {
            let ServiceEvent::ServiceResolved(info) = ev else {
                continue;
            };
            if info.fullname == self.fullname
                || info.txt_properties.get_property_val_str("id") == Some(self.id.as_str())
            {
                continue; // ourselves
            }
            let theirs: BTreeSet<&str> = info
                .txt_properties
                .iter()
                .filter(|p| p.key().starts_with("dk"))
                .flat_map(|p| p.val_str().split(',').collect::<Vec<_>>())
                .collect();
            if !theirs.iter().any(|t| self.tags.contains(*t)) {
                continue;
            }
            for ip in &info.addresses {
                let addr = match ip.to_ip_addr() {
                    IpAddr::V6(v6) => {
                        // A link-local address needs its interface to be dialled.
                        let scope = match ip {
                            mdns_sd::ScopedIp::V6(s) => s.scope_id().index,
                            _ => 0,
                        };
                        SocketAddr::V6(SocketAddrV6::new(v6, info.port, 0, scope))
                    }
                    v4 => SocketAddr::new(v4, info.port),
                };
                out.push(addr);
            }
        }
        out
    }

    /// Says goodbye (the service record is withdrawn) and stops the daemon.
    pub fn shutdown(self) {
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            // Bounded wait for the goodbye packets to leave.
            let _ = rx.recv_timeout(std::time::Duration::from_millis(500));
        }
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = rx.recv_timeout(std::time::Duration::from_millis(500));
        }
    }
}
