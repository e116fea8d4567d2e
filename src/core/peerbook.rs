//! Peers we know an address for, and when each may be dialled again.
//!
//! A peer that could not be reached, or that dropped us, is retried with exponential backoff
//! (capped, with seeded jitter so that many nodes restarted together do not retry in lockstep):
//! the node never reconnects in a tight loop, however a peer fails. Time is in ticks, like the
//! rest of the core.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default)]
struct Entry {
    failures: u32,
    next_attempt: u64,
    connected: bool,
    /// The address turned out to be this node: never dialled again, even when discovery or a
    /// `--peer` names it once more.
    ourselves: bool,
}

/// Addresses and their backoff state. `A` is whatever the caller dials (a socket address).
#[derive(Debug, Clone)]
pub struct PeerBook<A: Ord + Clone> {
    entries: BTreeMap<A, Entry>,
    base: u64,
    max: u64,
    seed: u64,
}

impl<A: Ord + Clone> PeerBook<A> {
    /// A book whose first retry waits `base` ticks, doubling per failure up to `max`.
    pub fn new(base: u64, max: u64, seed: u64) -> Self {
        Self {
            entries: BTreeMap::new(),
            base: base.max(1),
            max: max.max(base),
            seed,
        }
    }

    /// Remembers an address (no-op if known); it may be dialled at once.
    pub fn add(&mut self, addr: A) {
        self.entries.entry(addr).or_default();
    }

    /// Forgets an address.
    pub fn remove(&mut self, addr: &A) {
        self.entries.remove(addr);
    }

    /// Addresses not connected whose backoff has passed.
    pub fn due(&self, now: u64) -> Vec<A> {
        self.entries
            .iter()
            .filter(|(_, e)| !e.connected && !e.ourselves && e.next_attempt <= now)
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// When `addr` is dialled next: `None` if it is not in the book, connected, or never to be
    /// dialled again (it was ourselves).
    pub fn next_attempt(&self, addr: &A) -> Option<u64> {
        self.entries
            .get(addr)
            .filter(|e| !e.connected && !e.ourselves)
            .map(|e| e.next_attempt)
    }

    fn backoff(&self, failures: u32) -> u64 {
        let exp = self
            .base
            .saturating_mul(1u64 << failures.min(32))
            .min(self.max);
        // Up to 25% seeded jitter.
        let jitter = crate::core::replicator::mix(self.seed ^ u64::from(failures)) % (exp / 4 + 1);
        exp + jitter
    }

    /// A dial to `addr` starts now: it is not due again until it fails or the backoff passes.
    pub fn dialing(&mut self, addr: &A, now: u64) {
        let next = now + self.backoff(self.entries.get(addr).map_or(0, |e| e.failures));
        if let Some(e) = self.entries.get_mut(addr) {
            e.next_attempt = next;
        }
    }

    /// The dial failed (or the connection died before doing anything useful).
    pub fn failed(&mut self, addr: &A, now: u64) {
        let Some(failures) = self.entries.get(addr).map(|e| e.failures.saturating_add(1)) else {
            return;
        };
        let next = now + self.backoff(failures);
        let e = self.entries.get_mut(addr).expect("checked above");
        e.failures = failures;
        e.next_attempt = next;
        e.connected = false;
    }

    /// The connection is up: the backoff resets.
    pub fn connected(&mut self, addr: &A) {
        if let Some(e) = self.entries.get_mut(addr) {
            e.failures = 0;
            e.connected = true;
        }
    }

    /// A working connection ended; redial after the base delay.
    pub fn disconnected(&mut self, addr: &A, now: u64) {
        let next = now + self.backoff(0);
        if let Some(e) = self.entries.get_mut(addr) {
            e.connected = false;
            e.next_attempt = next;
        }
    }

    /// The dial reached this node itself: `addr` is never dialled again (kept, so that adding it
    /// again changes nothing).
    pub fn ourselves(&mut self, addr: &A) {
        if let Some(e) = self.entries.get_mut(addr) {
            e.ourselves = true;
            e.connected = false;
        }
    }

    /// The dial reached a peer that is already connected through another connection (both
    /// sides dialled, or it has two addresses): treat the address as connected until that
    /// connection ends ([`PeerBook::disconnected`]), so it is not redialled meanwhile.
    pub fn duplicate(&mut self, addr: &A) {
        if let Some(e) = self.entries.get_mut(addr) {
            e.failures = 0;
            e.connected = true;
        }
    }

    /// Consecutive failures of `addr`.
    pub fn failures(&self, addr: &A) -> u32 {
        self.entries.get(addr).map_or(0, |e| e.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut book = PeerBook::new(10, 1000, 7);
        book.add("a");
        assert_eq!(book.due(0), vec!["a"]);
        book.dialing(&"a", 0);
        assert!(
            book.due(0).is_empty(),
            "not redialled while a dial is under way"
        );
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..12 {
            book.failed(&"a", now);
            let next = (now..now + 2000)
                .find(|&t| !book.due(t).is_empty())
                .unwrap();
            waits.push(next - now);
            now = next;
        }
        assert!(
            waits.windows(2).take(6).all(|w| w[1] > w[0]),
            "grows: {waits:?}"
        );
        assert!(
            waits.iter().all(|&w| (10..=1250).contains(&w)),
            "bounded: {waits:?}"
        );
        assert!(waits[11] >= 1000, "reaches the cap: {waits:?}");
        book.connected(&"a");
        assert!(
            book.due(now + 10_000).is_empty(),
            "a connected peer is not dialled"
        );
        assert_eq!(book.failures(&"a"), 0);
        book.disconnected(&"a", now);
        assert!(book.due(now).is_empty());
        assert_eq!(book.due(now + 13), vec!["a"]);
    }

    #[test]
    fn ourselves_is_never_dialled_again_and_a_duplicate_waits_for_its_twin() {
        let mut book = PeerBook::new(10, 1000, 7);
        book.add("me");
        book.add("twin");
        book.dialing(&"me", 0);
        book.dialing(&"twin", 0);
        book.ourselves(&"me");
        book.add("me");
        book.duplicate(&"twin");
        assert!(book.due(1_000_000).is_empty(), "{:?}", book.due(1_000_000));
        // The peer's other connection ended: the address is dialled again after the base delay.
        book.disconnected(&"twin", 5);
        assert_eq!(book.due(5 + 13), vec!["twin"]);
    }
}
