//! The LAN address book: what discovery heard, bounded, aged and ranked, and which of it to
//! dial now.
//!
//! Feed tags are public, so anyone on the LAN can announce any address for them: every entry
//! here is a claim by a stranger. The book therefore
//! - holds at most [`Limits::per_node`] addresses per announcing service instance,
//!   [`Limits::per_tag`] per feed tag of ours and [`Limits::total`] in all; when a bucket is
//!   full a newcomer replaces the worst entry in it only if it ranks higher (see [`Rank`]);
//! - forgets an address that was not announced again within [`Limits::ttl`] (unless it is
//!   connected) or that failed [`Limits::max_failures`] times in a row;
//! - prefers addresses on one of this host's own subnets, both when keeping and when dialling
//!   (a hostile host can announce anything; it cannot make an off-link address answer faster);
//! - has at most [`Limits::in_flight`] of its dials under way at once, and counts a dial whose
//!   outcome never came back as failed after [`Limits::dial_deadline`], so a lost report
//!   cannot pin a slot.
//!
//! Pure logic on a caller-given clock: no sockets, testable without a network.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The book's bounds. [`Limits::default`] is what a node uses.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Addresses kept per announcing service instance.
    pub per_node: usize,
    /// Addresses kept per feed tag of ours.
    pub per_tag: usize,
    /// Addresses kept in all.
    pub total: usize,
    /// Dials from discovery under way at once.
    pub in_flight: usize,
    /// An address not announced again for this long is forgotten (unless connected).
    pub ttl: Duration,
    /// An address is forgotten after this many failed dials in a row.
    pub max_failures: u32,
    /// First retry after a failure; doubles per failure up to `backoff_max`.
    pub backoff_base: Duration,
    /// Longest wait between retries.
    pub backoff_max: Duration,
    /// A dial with no reported outcome after this long counts as failed.
    pub dial_deadline: Duration,
}

/// Dials from discovery under way at once, by default.
pub const DIALS_IN_FLIGHT: usize = 8;

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_node: 4,
            per_tag: 48,
            total: 64,
            in_flight: DIALS_IN_FLIGHT,
            ttl: Duration::from_secs(30 * 60),
            max_failures: 6,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            // Connect and handshake each have their own timeout in `net`; past both, the report
            // was lost (a dial cancelled without telling anyone).
            dial_deadline: crate::net::HANDSHAKE_TIMEOUT * 2 + Duration::from_secs(1),
        }
    }
}

/// One of this host's networks: an interface address and its netmask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalNet {
    /// An address of this host.
    pub addr: IpAddr,
    /// Its netmask (same family).
    pub netmask: IpAddr,
}

impl LocalNet {
    /// Whether `ip` is on this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, self.netmask, ip) {
            (IpAddr::V4(a), IpAddr::V4(m), IpAddr::V4(i)) => {
                let m = u32::from(m);
                u32::from(a) & m == u32::from(i) & m
            }
            (IpAddr::V6(a), IpAddr::V6(m), IpAddr::V6(i)) => {
                let m = u128::from(m);
                u128::from(a) & m == u128::from(i) & m
            }
            _ => false,
        }
    }
}

/// Whether an announced address may be dialled at all: never loopback (a stranger must not
/// steer us at this host's own services), unspecified, multicast or broadcast, nor port 0.
pub fn dialable(addr: &SocketAddr) -> bool {
    // An IPv4-mapped IPv6 address is its IPv4 address (`::ffff:127.0.0.1` is loopback).
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    addr.port() != 0
        && !ip.is_loopback()
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && !broadcast
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dial {
    /// Not dialling; may be dialled from `next`.
    Idle { next: Instant },
    /// A dial started at `since`.
    Dialing { since: Instant },
    /// Connected through this address.
    Connected,
}

#[derive(Debug, Clone)]
struct Entry {
    node: String,
    tags: BTreeSet<String>,
    same_subnet: bool,
    last_seen: Instant,
    failures: u32,
    dial: Dial,
}

/// How much an entry is worth keeping: bigger is better. Connected beats everything (it is
/// proven), then on-subnet, then fewer failures, then more recently announced.
type Rank = (bool, bool, std::cmp::Reverse<u32>, Instant);

impl Entry {
    fn rank(&self) -> Rank {
        (
            self.dial == Dial::Connected,
            self.same_subnet,
            std::cmp::Reverse(self.failures),
            self.last_seen,
        )
    }
}

/// What [`LanBook::offer`] did with an announcement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offered {
    /// New addresses kept.
    pub added: usize,
    /// Known addresses announced again.
    pub refreshed: usize,
    /// Addresses refused: not dialable, or not better than what a full bucket holds.
    pub refused: usize,
    /// Worse entries forgotten to make room.
    pub evicted: usize,
}

/// Discovered addresses (see the module docs).
#[derive(Debug, Clone)]
pub struct LanBook {
    limits: Limits,
    nets: Vec<LocalNet>,
    entries: BTreeMap<SocketAddr, Entry>,
}

impl LanBook {
    /// An empty book; `nets` are this host's networks (for the subnet preference).
    pub fn new(limits: Limits, nets: Vec<LocalNet>) -> Self {
        Self {
            limits,
            nets,
            entries: BTreeMap::new(),
        }
    }

    /// This host's networks changed (interfaces came or went).
    pub fn set_nets(&mut self, nets: Vec<LocalNet>) {
        self.nets = nets;
        let nets = &self.nets;
        for (a, e) in &mut self.entries {
            e.same_subnet = nets.iter().any(|n| n.contains(a.ip()));
        }
    }

    /// Addresses held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `addr` is held.
    pub fn contains(&self, addr: &SocketAddr) -> bool {
        self.entries.contains_key(addr)
    }

    /// Dials under way.
    pub fn in_flight(&self) -> usize {
        self.entries
            .values()
            .filter(|e| matches!(e.dial, Dial::Dialing { .. }))
            .count()
    }

    /// Service instance `node` announced `addrs` for our feed tags `tags` (those it shares with
    /// us; never empty in use). Ranks its addresses, keeps what the caps allow.
    pub fn offer(
        &mut self,
        node: &str,
        tags: &BTreeSet<String>,
        addrs: &[SocketAddr],
        now: Instant,
    ) -> Offered {
        let mut out = Offered::default();
        // On-subnet first, so that a node announcing many addresses keeps its useful ones.
        let mut ranked: Vec<(bool, SocketAddr)> = Vec::new();
        for a in addrs {
            if !dialable(a) || ranked.iter().any(|(_, b)| b == a) {
                out.refused += usize::from(!dialable(a));
                continue;
            }
            ranked.push((self.on_subnet(a.ip()), *a));
        }
        ranked.sort_by_key(|(s, _)| !*s);
        for (same_subnet, addr) in ranked {
            if let Some(e) = self.entries.get_mut(&addr) {
                e.last_seen = now;
                e.tags.extend(tags.iter().cloned());
                out.refreshed += 1;
                continue;
            }
            let new = Entry {
                node: node.to_string(),
                tags: tags.clone(),
                same_subnet,
                last_seen: now,
                failures: 0,
                dial: Dial::Idle { next: now },
            };
            let rank = new.rank();
            let mut evicted = Vec::new();
            let ok = self.make_room(&mut evicted, self.limits.per_node, rank, |e| e.node == node)
                && tags.iter().all(|t| {
                    self.make_room(&mut evicted, self.limits.per_tag, rank, |e| {
                        e.tags.contains(t)
                    })
                })
                && self.make_room(&mut evicted, self.limits.total, rank, |_| true);
            if ok {
                out.evicted += evicted.len();
                self.entries.insert(addr, new);
                out.added += 1;
            } else {
                out.refused += 1;
            }
        }
        out
    }

    /// Ensures that fewer than `cap` entries match `filter`, by forgetting the worst of them if
    /// it ranks below `rank`. False if the bucket is full of entries at least as good.
    fn make_room(
        &mut self,
        evicted: &mut Vec<SocketAddr>,
        cap: usize,
        rank: Rank,
        filter: impl Fn(&Entry) -> bool,
    ) -> bool {
        let in_bucket = || self.entries.iter().filter(|(_, e)| filter(e));
        if in_bucket().count() < cap {
            return true;
        }
        // An entry being dialled stays until its outcome: forgetting it would free its
        // in-flight slot while the dial still runs.
        let worst = in_bucket()
            .filter(|(_, e)| !matches!(e.dial, Dial::Dialing { .. }))
            .min_by_key(|(_, e)| e.rank())
            .map(|(a, e)| (*a, e.rank()));
        match worst {
            Some((a, r)) if r < rank && cap > 0 => {
                self.entries.remove(&a);
                evicted.push(a);
                // One out, one in: the bucket had exactly `cap` (it never exceeds it).
                true
            }
            _ => false,
        }
    }

    fn on_subnet(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(ip))
    }

    /// Addresses to dial now, best first, at most as many as the in-flight limit leaves room
    /// for; each is marked as being dialled. Also counts overdue dials as failed and forgets
    /// aged entries.
    pub fn due(&mut self, now: Instant) -> Vec<SocketAddr> {
        self.expire(now);
        let room = self.limits.in_flight.saturating_sub(self.in_flight());
        let mut ready: Vec<(SocketAddr, Rank)> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.dial, Dial::Idle { next } if next <= now))
            .map(|(a, e)| (*a, e.rank()))
            .collect();
        // Best class first (on-subnet, fewest failures); within a class the longest-known
        // first, so that a host re-announcing all the time does not jump the queue.
        ready.sort_by_key(|(_, (c, s, f, seen))| (std::cmp::Reverse((*c, *s, *f)), *seen));
        ready.truncate(room);
        let out: Vec<SocketAddr> = ready.into_iter().map(|(a, _)| a).collect();
        for a in &out {
            if let Some(e) = self.entries.get_mut(a) {
                e.dial = Dial::Dialing { since: now };
            }
        }
        out
    }

    /// Counts dials past their deadline as failed, then forgets what aged out or failed too
    /// often. Returns how many entries were forgotten.
    pub fn expire(&mut self, now: Instant) -> usize {
        let overdue: Vec<SocketAddr> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                matches!(e.dial, Dial::Dialing { since }
                    if now.saturating_duration_since(since) >= self.limits.dial_deadline)
            })
            .map(|(a, _)| *a)
            .collect();
        for a in overdue {
            self.failed(&a, now);
        }
        let before = self.entries.len();
        let (ttl, max_failures) = (self.limits.ttl, self.limits.max_failures);
        self.entries.retain(|_, e| {
            let idle = matches!(e.dial, Dial::Idle { .. });
            let aged = now.saturating_duration_since(e.last_seen) >= ttl;
            !(idle && (aged || e.failures >= max_failures))
        });
        before - self.entries.len()
    }

    /// A dial to `addr` (ours or not) failed, or its connection was turned away.
    pub fn failed(&mut self, addr: &SocketAddr, now: Instant) {
        let Some(e) = self.entries.get_mut(addr) else {
            return;
        };
        e.failures = e.failures.saturating_add(1);
        let shift = e.failures.saturating_sub(1).min(16);
        let wait = self
            .limits
            .backoff_base
            .saturating_mul(1u32 << shift)
            .min(self.limits.backoff_max);
        e.dial = Dial::Idle { next: now + wait };
    }

    /// How long until `addr` is dialled again, if it is held and waiting.
    pub fn retry_in(&self, addr: &SocketAddr, now: Instant) -> Option<Duration> {
        match self.entries.get(addr)?.dial {
            Dial::Idle { next } => Some(next.saturating_duration_since(now)),
            _ => None,
        }
    }

    /// A dial to `addr` reached a peer we already have a connection with (both sides dialled,
    /// or it dialled us first): the address works, so it is not a failure and not forgotten,
    /// but redialling it soon would only repeat that; wait the longest backoff.
    pub fn duplicate(&mut self, addr: &SocketAddr, now: Instant) {
        if let Some(e) = self.entries.get_mut(addr) {
            e.last_seen = now;
            e.dial = Dial::Idle {
                next: now + self.limits.backoff_max,
            };
        }
    }

    /// A dial to `addr` connected.
    pub fn connected(&mut self, addr: &SocketAddr, now: Instant) {
        if let Some(e) = self.entries.get_mut(addr) {
            e.failures = 0;
            e.last_seen = now;
            e.dial = Dial::Connected;
        }
    }

    /// The connection we dialled to `addr` ended: redial after the base delay.
    pub fn disconnected(&mut self, addr: &SocketAddr, now: Instant) {
        if let Some(e) = self.entries.get_mut(addr) {
            e.last_seen = now;
            e.dial = Dial::Idle {
                next: now + self.limits.backoff_base,
            };
        }
    }
}

#[cfg(test)]
#[path = "book_tests.rs"]
mod tests;
