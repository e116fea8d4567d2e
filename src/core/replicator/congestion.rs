//! Per-peer congestion control: the round-trip estimator that sets the request timeout, and the
//! pipelining window that sets how many blocks may be asked of the peer at once.
//!
//! Kept apart from the request bookkeeping so that the control law can be read (and tuned) on
//! its own: it sees only round-trip samples, answer sizes and timeouts, never messages.

use super::Config;

/// Round-trip estimate and pipelining window of one peer.
#[derive(Debug, Clone)]
pub(super) struct Congestion {
    /// Pipelining window in blocks (fractional so it can grow by 1/window per answer).
    window: f64,
    /// Smoothed round trip (RFC 6298), once one was measured.
    srtt: Option<f64>,
    /// Round-trip variance (RFC 6298).
    rttvar: f64,
    /// Lowest round trip seen: the peer's answer time with nothing queued.
    min_rtt: f64,
}

impl Congestion {
    /// A fresh peer: `initial_window` blocks, no round trip measured yet.
    pub(super) fn new(initial_window: u32) -> Self {
        Self {
            window: f64::from(initial_window),
            srtt: None,
            rttvar: 0.0,
            min_rtt: f64::INFINITY,
        }
    }

    /// The smoothed round trip, if one was measured.
    pub(super) fn srtt(&self) -> Option<f64> {
        self.srtt
    }

    /// Ticks after which a request to this peer counts as lost: smoothed RTT + 4 x variance, as
    /// in TCP, within the configured bounds. Before any sample, five times the lower bound.
    pub(super) fn request_timeout(&self, config: &Config) -> u64 {
        let rto = match self.srtt {
            Some(srtt) => (srtt + 4.0 * self.rttvar).ceil() as u64,
            None => config.min_request_timeout * 5,
        };
        rto.clamp(config.min_request_timeout, config.max_request_timeout)
    }

    /// Window slots not taken by the `live` blocks already asked for.
    pub(super) fn free(&self, live: u32) -> u32 {
        (self.window as u32).saturating_sub(live)
    }

    /// An answer carrying `blocks` blocks came back after `rtt` ticks. `alone`: this peer is the
    /// only one we can fetch the feed from (see [`Congestion::adapt_window`]).
    pub(super) fn on_answer(&mut self, rtt: f64, blocks: u64, max_window: u32, alone: bool) {
        self.sample_rtt(rtt);
        self.adapt_window(rtt, blocks, max_window, alone);
    }

    /// Requests expired: halve the window, as TCP does on loss.
    pub(super) fn on_timeout(&mut self) {
        self.window = (self.window / 2.0).max(1.0);
    }

    /// The window grows by one block per window of blocks answered (TCP's congestion
    /// avoidance) and halves on a timeout. While other peers could serve the feed too, it also
    /// shrinks once answers come back slower than twice the quickest round trip (delay-based,
    /// in the spirit of TCP Vegas / LEDBAT): a peer then holds about its bandwidth-delay product
    /// of our requests, a busy seeder's queue stays short, and blocks not yet asked of it can
    /// still be fetched from the other readers (`benches/swarm.rs`: without it eight readers
    /// took 1.5x, with it 1.2x the time of one).
    ///
    /// With one source (`alone`), delay says nothing we can act on, and it misreads a long lossy
    /// link (#12): blocks queued behind each other come back one serialisation time apart, and
    /// every lost packet holds up the blocks behind it until TCP repairs it, so the window
    /// settled near four 64 KiB blocks and a clone used a third of a 20 Mbit/s, 50 ms, 1%-loss
    /// link (`benches/wan.rs`, `notes/wan.md`). Alone, only timeouts shrink it.
    /// `blocks` is how many blocks the answer carried: the window moves by that many steps.
    fn adapt_window(&mut self, rtt: f64, blocks: u64, max: u32, alone: bool) {
        self.min_rtt = self.min_rtt.min(rtt);
        let step = blocks.max(1) as f64 / self.window;
        if alone || rtt <= self.min_rtt * 2.0 + 2.0 {
            self.window = (self.window + step).min(f64::from(max));
        } else {
            self.window = (self.window - step).max(1.0);
        }
    }

    fn sample_rtt(&mut self, rtt: f64) {
        // RFC 6298 smoothing.
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2.0;
            }
            Some(srtt) => {
                self.rttvar = 0.75 * self.rttvar + 0.25 * (srtt - rtt).abs();
                self.srtt = Some(0.875 * srtt + 0.125 * rtt);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_grows_on_answers_shrinks_on_delay_unless_alone_and_halves_on_timeout() {
        let mut c = Congestion::new(8);
        assert_eq!(c.free(3), 5);
        for _ in 0..8 {
            c.on_answer(10.0, 1, 256, false);
        }
        let grown = c.window;
        assert!(grown > 8.5, "window {grown}");
        // With other sources about, answers at three times the best round trip mean a queue is
        // building at this peer: shrink.
        c.on_answer(30.0, 1, 256, false);
        assert!(c.window < grown);
        // Our only source: slower answers are no reason to ask less of it.
        let shrunk = c.window;
        c.on_answer(30.0, 1, 256, true);
        assert!(c.window > shrunk);
        let before = c.window;
        c.on_timeout();
        assert_eq!(c.window, (before / 2.0).max(1.0));
        for _ in 0..100 {
            c.on_timeout();
        }
        assert_eq!(c.window, 1.0, "never below one block");
    }

    #[test]
    fn the_timeout_follows_the_round_trip_within_bounds() {
        let config = Config::default();
        let mut c = Congestion::new(8);
        assert_eq!(c.request_timeout(&config), config.min_request_timeout * 5);
        c.on_answer(40.0, 1, 256, false);
        // srtt 40, rttvar 20: 40 + 80.
        assert_eq!(c.srtt(), Some(40.0));
        assert_eq!(c.request_timeout(&config), 120);
        c.on_answer(1e9, 1, 256, false);
        assert_eq!(c.request_timeout(&config), config.max_request_timeout);
    }
}
