//! The replicator's tuning knobs and caps.

/// Tuning knobs, in ticks (the caller decides how long a tick is; the synchronizer uses 10 ms).
#[derive(Debug, Clone)]
pub struct Config {
    /// Fetch blocks in index order (for a reassembly store) instead of rarest-first.
    pub ordered: bool,
    /// In ordered mode, how far past the first missing block requests may reach.
    pub max_ahead: u64,
    /// In ordered mode, while other peers are fetching too: how many blocks past the first
    /// missing one are taken rarest-first from a per-node phase (0: always strictly in order).
    pub spread: u64,
    /// The same window as a span of bytes: the window is `spread_bytes` of blocks of the
    /// feed's average size, and at least `spread` blocks.
    pub spread_bytes: u64,
    /// Requests in flight to a new peer.
    pub initial_window: u32,
    /// Most requests in flight to one peer.
    pub max_window: u32,
    /// Lower bound of the request timeout.
    pub min_request_timeout: u64,
    /// Upper bound of the request timeout.
    pub max_request_timeout: u64,
    /// A peer that sends nothing at all for this long is dropped (we ping every
    /// `ping_interval`, so a live peer always has something to say).
    pub idle_timeout: u64,
    /// A peer whose requests expire this many times in a row, without one answer, is dropped.
    pub max_strikes: u32,
    /// Re-send status, haves and unanswered opens this often.
    pub announce_interval: u64,
    /// Ping a quiet peer this often.
    pub ping_interval: u64,
    /// Most block indices examined per scheduling pass and feed.
    pub scan_limit: u64,
    /// Most blocks asked for in one request (a contiguous range held by one peer).
    pub max_request_blocks: u64,
    /// Seed for tie-breaks (make it differ between nodes).
    pub seed: u64,
    /// Most runs kept of one peer's haves for one feed. Past it the set keeps a subset of what
    /// the peer announced (safe: we never ask for a block it did not announce), so a peer naming
    /// millions of single blocks costs at most this many entries (~30 bytes each).
    pub max_peer_runs: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ordered: false,
            max_ahead: 1024,
            spread: 64,
            spread_bytes: 8 * 1024 * 1024,
            initial_window: 8,
            max_window: 256,
            min_request_timeout: 20,
            max_request_timeout: 1000,
            idle_timeout: 3000,
            max_strikes: 16,
            announce_interval: 100,
            ping_interval: 500,
            scan_limit: 8192,
            max_request_blocks: 16,
            seed: 0,
            max_peer_runs: 16_384,
        }
    }
}
