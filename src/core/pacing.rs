//! How many bytes of answers one connection may have queued: the sending side's half of
//! swarming, shared by the synchronizer (`sync::connections`) and the simulator (`core::sim`),
//! so that the simulator tests the policy production runs.
//!
//! **Why it matters.** The uploader decides *what* to send (blocks nobody has yet first, see
//! `replicator/upload.rs`) only at the moment it pulls an answer from the replicator. Whatever
//! sits in a connection's queue was decided earlier, for a swarm that has moved on since. A
//! fixed budget of 4 MiB per connection (the synchronizer before #12) let a seeder with eight
//! readers on a 4 MB/s uplink commit 32 MiB -- eight seconds of its uplink -- to whoever asked
//! first: it sent copies of the same blocks to every reader, the readers had nothing to trade,
//! and every control message (a request, a `Have`) waited seconds behind the data queued ahead
//! of it on the same stream. So:
//!
//! - The budget follows the connection's measured drain rate: [`SendBudget::allowed`] is about
//!   [`TARGET_DELAY_US`] of sending at that rate, between [`MIN_BUDGET`] (one piece of one block
//!   always fits) and [`MAX_BUDGET`]. A fast link (loopback, LAN) gets a deep queue and full
//!   throughput; a slow or shared one gets a short queue and a fresh decision for every piece.
//! - The rate is measured only over intervals in which the connection had answers waiting the
//!   whole time (a connection that idled says nothing about what it could carry), except that a
//!   faster sample always raises it (a link never carries more than it can).
//! - Control messages do not wait behind answers: the connection's writer takes them first
//!   (`net::write_batches`; the simulator's links do the same).

/// Queue depth aimed at, as time at the measured rate: short enough that the uploader decides
/// close to the wire, long enough that the writer never runs dry between the loop's turns.
pub const TARGET_DELAY_US: u64 = 100_000;
/// Smallest budget: one 64 KiB block (a piece of one block is always allowed).
pub const MIN_BUDGET: u64 = 64 * 1024;
/// Largest budget: what one slow peer may hold of our memory (the former fixed budget).
pub const MAX_BUDGET: u64 = 4 * 1024 * 1024;
/// Length of one rate-measurement interval.
const INTERVAL_US: u64 = 50_000;

/// One connection's sending budget (see the module docs). Times are microseconds from any
/// fixed origin (the caller's clock: `Instant` in production, simulated time in the simulator).
#[derive(Debug, Clone)]
pub struct SendBudget {
    /// Measured drain rate, bytes per second (0: not measured yet).
    rate: f64,
    /// Start of the current interval.
    since: u64,
    /// Answer bytes written in the current interval.
    written: u64,
    /// The queue was never empty during the current interval.
    backlogged: bool,
}

impl SendBudget {
    /// A new connection: nothing measured, so [`MIN_BUDGET`] until it has carried something
    /// (the first interval grows it at once on a fast link).
    pub fn new(now: u64) -> Self {
        Self {
            rate: 0.0,
            since: now,
            written: 0,
            backlogged: false,
        }
    }

    /// Bytes of answers that may be queued now.
    pub fn allowed(&self) -> u64 {
        let by_rate = (self.rate * TARGET_DELAY_US as f64 / 1e6) as u64;
        by_rate.clamp(MIN_BUDGET, MAX_BUDGET)
    }

    /// The measured drain rate in bytes per second (0 before the first measurement).
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// `bytes` of answers left the queue (were written to the socket); `queued` is what is
    /// still waiting after that.
    pub fn on_written(&mut self, now: u64, bytes: u64, queued: u64) {
        self.written += bytes;
        self.roll(now, queued);
        if queued == 0 {
            self.backlogged = false;
        }
    }

    /// The queue holds `queued` bytes of answers now (call when answers are added).
    pub fn on_queued(&mut self, now: u64, queued: u64) {
        self.roll(now, queued);
    }

    /// Closes the current interval if it is over, folding its sample into the rate; the next
    /// one counts as backlogged if answers are waiting as it starts.
    fn roll(&mut self, now: u64, queued: u64) {
        let elapsed = now.saturating_sub(self.since);
        if elapsed < INTERVAL_US {
            return;
        }
        let sample = self.written as f64 * 1e6 / elapsed as f64;
        if self.backlogged {
            // The link was the limit: trust the sample, smoothed.
            self.rate = if self.rate == 0.0 {
                sample
            } else {
                0.5 * self.rate + 0.5 * sample
            };
        } else if sample > self.rate {
            // Not backlogged, yet faster than we thought: the link can carry at least this.
            self.rate = sample;
        }
        self.since = now;
        self.written = 0;
        self.backlogged = queued > 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a budget against a link of `rate` bytes/s that is always given enough to send.
    fn saturate(b: &mut SendBudget, rate: u64, from: u64, for_us: u64) -> u64 {
        let mut now = from;
        let step = 1_000;
        while now < from + for_us {
            let queued = b.allowed();
            b.on_queued(now, queued);
            now += step;
            let sent = (rate * step / 1_000_000).min(queued);
            b.on_written(now, sent, queued - sent);
        }
        now
    }

    #[test]
    fn a_slow_link_gets_a_short_queue_and_a_fast_one_a_deep_queue() {
        let mut slow = SendBudget::new(0);
        assert_eq!(slow.allowed(), MIN_BUDGET, "nothing measured yet");
        saturate(&mut slow, 500_000, 0, 2_000_000);
        assert_eq!(
            slow.allowed(),
            MIN_BUDGET,
            "0.5 MB/s x 100 ms is below one block"
        );
        let mut medium = SendBudget::new(0);
        saturate(&mut medium, 8_000_000, 0, 2_000_000);
        let m = medium.allowed();
        assert!((700_000..=900_000).contains(&m), "8 MB/s x 100 ms: {m}");
        let mut fast = SendBudget::new(0);
        saturate(&mut fast, 1_000_000_000, 0, 2_000_000);
        assert_eq!(fast.allowed(), MAX_BUDGET);
    }

    #[test]
    fn an_idle_connection_keeps_its_rate_and_a_slower_link_lowers_it() {
        let mut b = SendBudget::new(0);
        let now = saturate(&mut b, 20_000_000, 0, 1_000_000);
        let before = b.allowed();
        // The queue drains, then a second of nothing to send. The rate must not fall.
        b.on_written(now, 0, 0);
        b.on_written(now + 1_000_000, 0, 0);
        b.on_written(now + 1_100_000, 0, 0);
        assert_eq!(b.allowed(), before);
        // The link slows to a tenth while always backlogged: the budget follows it down.
        saturate(&mut b, 2_000_000, now + 1_100_000, 2_000_000);
        assert!(b.allowed() < before / 4, "{} vs {before}", b.allowed());
    }
}
