//! The blind relay: a rendezvous that forwards bytes between two peers that both dialled out to
//! it, for peers behind NATs that accept no inbound connection (SPEC §9.3).
//!
//! **Why blind.** The relay matches two connections by a 32-byte token derived from a feed's
//! discovery key ([`super::relay_token`]), and then copies bytes. The Noise handshake runs end
//! to end *through* it: the relay never holds a key, never sees plaintext, and cannot learn the
//! feed's public key from the token (a one-way derivation of a one-way derivation). What it does
//! see is that two addresses met under the same token, and how many bytes passed.
//!
//! **The wire, before the pair is made.** A client sends [`MAGIC`], a mode byte ([`WAIT`]: "I
//! accept connections under this token", or [`DIAL`]: "connect me to someone waiting"), the
//! token, and an 8-byte random *session* tag of its process, so that the relay never pairs a
//! node with its own registration (the relay learns nothing from it that the source address
//! did not tell). The relay answers one byte:
//! - [`PAIRED_RESPONDER`] to the waiting side and [`PAIRED_INITIATOR`] to the dialling side once
//!   it has paired them (each then runs the ordinary handshake in that role);
//! - [`NOBODY_WAITING`] to a dialler when no one waits under its token;
//! - [`REFUSED`] when a cap is reached.
//!
//! After the pairing byte, the stream is the peer's: every byte is forwarded as it is.
//!
//! **Caps** ([`RelayLimits`]): connections in all and per source address, waiters per token, a
//! byte rate per pair (both directions together), an idle timeout per pair, a lifetime for an
//! unpaired waiter and a deadline for the hello. A client that sends anything after its hello
//! while it waits is cut. Nothing a client sends sizes an allocation: the hello is fixed-size.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// First bytes of every hello.
pub const MAGIC: &[u8; 8] = b"FSRELAY1";
/// Hello mode: wait under the token for a dialler.
pub const WAIT: u8 = 0;
/// Hello mode: be paired with someone waiting under the token.
pub const DIAL: u8 = 1;
/// Answer: paired; run the handshake as the responder.
pub const PAIRED_RESPONDER: u8 = 0;
/// Answer: paired; run the handshake as the initiator.
pub const PAIRED_INITIATOR: u8 = 1;
/// Answer to a dialler: nobody waits under this token.
pub const NOBODY_WAITING: u8 = 2;
/// Answer: a cap is reached; try later.
pub const REFUSED: u8 = 3;
/// Length of a hello: magic, mode, token, session.
pub const HELLO_LEN: usize = 8 + 1 + 32 + 8;

/// A relay's caps. [`RelayLimits::default`] is what `feedsync relay` uses unless told otherwise.
#[derive(Debug, Clone)]
pub struct RelayLimits {
    /// Connections held at once (waiting, paired or saying hello).
    pub max_connections: usize,
    /// Connections held at once from one source address.
    pub max_per_ip: usize,
    /// Waiters held per token.
    pub max_waiting_per_token: usize,
    /// Bytes per second one pair may move, both directions together (0: no cap).
    pub rate: u64,
    /// A pair that moves no byte for this long is closed.
    pub idle: Duration,
    /// A waiter nobody pairs with is closed after this long (the client registers again).
    pub wait: Duration,
    /// The hello must arrive within this long.
    pub hello: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_per_ip: 32,
            max_waiting_per_token: 8,
            rate: 16 * 1024 * 1024,
            idle: Duration::from_secs(300),
            wait: Duration::from_secs(600),
            hello: Duration::from_secs(10),
        }
    }
}

/// What a relay counted, for its log and for tests.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Pairs made.
    pub paired: AtomicU64,
    /// Bytes forwarded, both directions.
    pub forwarded: AtomicU64,
    /// Connections turned away by a cap.
    pub refused: AtomicU64,
}

struct Waiter {
    id: u64,
    session: [u8; 8],
    /// Takes the dialler's stream and its place in the counts; the waiter's task answers
    /// both and runs the pair (so a pair holds two places until it ends).
    give: oneshot::Sender<(TcpStream, Slot)>,
}

#[derive(Default)]
struct State {
    connections: usize,
    per_ip: HashMap<IpAddr, usize>,
    waiting: HashMap<[u8; 32], VecDeque<Waiter>>,
    next_id: u64,
}

/// One connection's place in the counts; given back on drop.
struct Slot {
    state: Arc<Mutex<State>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.connections = s.connections.saturating_sub(1);
        if let Some(n) = s.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Serves the relay on `listener` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    limits: RelayLimits,
    stats: Arc<RelayStats>,
    cancel: CancellationToken,
) {
    let state = Arc::new(Mutex::new(State::default()));
    let limits = Arc::new(limits);
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, from) = match accepted {
            Ok(a) => a,
            // e.g. out of descriptors: wait a moment rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            let ip = from.ip();
            let here = s.per_ip.get(&ip).copied().unwrap_or(0);
            if s.connections >= limits.max_connections || here >= limits.max_per_ip {
                None
            } else {
                s.connections += 1;
                *s.per_ip.entry(ip).or_insert(0) += 1;
                Some(Slot {
                    state: state.clone(),
                    ip,
                })
            }
        };
        let Some(slot) = slot else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            // Best effort, never waited on: the answer fits any socket buffer.
            let _ = stream.try_write(&[REFUSED]);
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(client(
            stream,
            slot,
            state.clone(),
            limits.clone(),
            stats.clone(),
            cancel.clone(),
        ));
    }
}

/// One client from its hello to its end.
async fn client(
    mut stream: TcpStream,
    slot: Slot,
    state: Arc<Mutex<State>>,
    limits: Arc<RelayLimits>,
    stats: Arc<RelayStats>,
    cancel: CancellationToken,
) {
    let mut hello = [0u8; HELLO_LEN];
    let read = tokio::select! {
        _ = cancel.cancelled() => return,
        r = tokio::time::timeout(limits.hello, stream.read_exact(&mut hello)) => r,
    };
    if !matches!(read, Ok(Ok(_))) || &hello[..8] != MAGIC {
        return;
    }
    let mode = hello[8];
    let token: [u8; 32] = hello[9..41].try_into().expect("fixed-size hello");
    let session: [u8; 8] = hello[41..].try_into().expect("fixed-size hello");
    match mode {
        WAIT => wait(stream, slot, (token, session), state, limits, stats, cancel).await,
        DIAL => {
            // Hand the stream to the oldest live waiter; a waiter whose task ended is skipped.
            let mut dialler = (stream, slot);
            loop {
                let waiter = {
                    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                    // The oldest waiter that is not the dialler's own process.
                    let w = s.waiting.get_mut(&token).and_then(|q| {
                        let at = q.iter().position(|w| w.session != session)?;
                        q.remove(at)
                    });
                    if s.waiting.get(&token).is_some_and(VecDeque::is_empty) {
                        s.waiting.remove(&token);
                    }
                    w
                };
                let Some(w) = waiter else {
                    let _ = dialler.0.write_all(&[NOBODY_WAITING]).await;
                    return;
                };
                match w.give.send(dialler) {
                    // The waiter's task runs the pair.
                    Ok(()) => return,
                    Err(back) => dialler = back,
                }
            }
        }
        _ => {}
    }
}

/// A waiter: held until a dialler comes, its own connection closes, it sends out of turn, or
/// [`RelayLimits::wait`] passes.
async fn wait(
    mut stream: TcpStream,
    slot: Slot,
    (token, session): ([u8; 32], [u8; 8]),
    state: Arc<Mutex<State>>,
    limits: Arc<RelayLimits>,
    stats: Arc<RelayStats>,
    cancel: CancellationToken,
) {
    let (give, take) = oneshot::channel();
    let id = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        let id = s.next_id;
        s.next_id += 1;
        let queue = s.waiting.entry(token).or_default();
        if queue.len() >= limits.max_waiting_per_token {
            None
        } else {
            queue.push_back(Waiter { id, session, give });
            Some(id)
        }
    };
    let Some(id) = id else {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        let _ = stream.write_all(&[REFUSED]).await;
        return;
    };
    let mut probe = [0u8; 1];
    let dialler = tokio::select! {
        _ = cancel.cancelled() => None,
        _ = tokio::time::sleep(limits.wait) => None,
        // A waiter has nothing to say before it is paired: any byte or EOF ends it.
        _ = stream.read(&mut probe) => None,
        d = take => d.ok(),
    };
    let Some((mut dialler, dialler_slot)) = dialler else {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(q) = s.waiting.get_mut(&token) {
            q.retain(|w| w.id != id);
            if q.is_empty() {
                s.waiting.remove(&token);
            }
        }
        return;
    };
    if stream.write_all(&[PAIRED_RESPONDER]).await.is_err()
        || dialler.write_all(&[PAIRED_INITIATOR]).await.is_err()
    {
        return;
    }
    stats.paired.fetch_add(1, Ordering::Relaxed);
    pump(stream, dialler, &limits, &stats, &cancel).await;
    drop((slot, dialler_slot));
}

/// A token bucket over bytes, shared by both directions of a pair.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        let rate = rate as f64;
        // A tenth of a second of bytes, and at least one read's worth.
        let burst = (rate / 10.0).max(PUMP_BUF as f64);
        Self {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Takes `n` bytes' worth now, or says how long until there are enough.
    fn take(&mut self, n: usize) -> Option<Duration> {
        let now = Instant::now();
        let gained = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + gained).min(self.burst);
        self.at = now;
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            None
        } else {
            Some(Duration::from_secs_f64((n - self.tokens) / self.rate))
        }
    }
}

const PUMP_BUF: usize = 16 * 1024;

/// Copies both ways until either side ends, the pair idles past [`RelayLimits::idle`], or the
/// relay stops. Bytes are paced by the pair's bucket.
async fn pump(
    a: TcpStream,
    b: TcpStream,
    limits: &RelayLimits,
    stats: &RelayStats,
    cancel: &CancellationToken,
) {
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let bucket = (limits.rate > 0).then(|| Mutex::new(Bucket::new(limits.rate)));
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let idle = async {
        loop {
            let since =
                (start.elapsed().as_millis() as u64).saturating_sub(last.load(Ordering::Relaxed));
            let left = limits.idle.as_millis() as u64;
            if since >= left {
                return;
            }
            tokio::time::sleep(Duration::from_millis(left - since)).await;
        }
    };
    // Either direction ending ends the pair: a feedsync connection is over when one side
    // closes, and a half-open pair would only hold a slot.
    let one = Half {
        start,
        last: &last,
        bucket: bucket.as_ref(),
        stats,
    };
    tokio::select! {
        _ = one.copy(ar, bw) => {}
        _ = one.copy(br, aw) => {}
        _ = idle => {}
        _ = cancel.cancelled() => {}
    }
}

/// What both directions of a pair share.
#[derive(Clone, Copy)]
struct Half<'a> {
    start: Instant,
    last: &'a AtomicU64,
    bucket: Option<&'a Mutex<Bucket>>,
    stats: &'a RelayStats,
}

impl Half<'_> {
    /// Copies `from` to `to` until either fails or ends, paced by the bucket.
    async fn copy(
        self,
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
    ) {
        let mut buf = vec![0u8; PUMP_BUF];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(bucket) = self.bucket {
                loop {
                    let wait = bucket.lock().unwrap_or_else(|p| p.into_inner()).take(n);
                    match wait {
                        None => break,
                        Some(d) => tokio::time::sleep(d).await,
                    }
                }
            }
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
            self.stats.forwarded.fetch_add(n as u64, Ordering::Relaxed);
            let now = self.start.elapsed().as_millis() as u64;
            self.last.store(now, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    }
}

/// Why a client's relay attempt came to nothing.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// TCP to the relay failed.
    #[error("relay {relay}: {source}")]
    Connect {
        /// The relay.
        relay: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The relay did not answer in time.
    #[error("relay {0}: no answer in time")]
    TimedOut(SocketAddr),
    /// Nobody waits under the token there.
    #[error("relay {0}: no peer waiting")]
    NobodyWaiting(SocketAddr),
    /// The relay turned us away (a cap), or answered nonsense.
    #[error("relay {0}: refused")]
    Refused(SocketAddr),
}

/// The hello for `mode` under `token`, from this process's session.
pub fn hello(mode: u8, token: &[u8; 32]) -> [u8; HELLO_LEN] {
    static SESSION: std::sync::OnceLock<[u8; 8]> = std::sync::OnceLock::new();
    let session = SESSION.get_or_init(|| {
        let mut s = [0u8; 8];
        // Without randomness the tag is only less unique; a self-pairing is refused later by
        // the handshake ("that is this node") anyway.
        let _ = getrandom::fill(&mut s);
        s
    });
    let mut h = [0u8; HELLO_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8] = mode;
    h[9..41].copy_from_slice(token);
    h[41..].copy_from_slice(session);
    h
}

/// Connects to `relay` and says hello; `answer` bounds the wait for the one-byte answer.
/// Returns the stream (positioned just past the answer) and the answer.
pub async fn meet(
    relay: SocketAddr,
    mode: u8,
    token: &[u8; 32],
    answer: Duration,
) -> Result<(TcpStream, u8), RelayError> {
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(relay)).await;
    let mut stream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(RelayError::Connect { relay, source }),
        Err(_) => return Err(RelayError::TimedOut(relay)),
    };
    let _ = stream.set_nodelay(true);
    stream
        .write_all(&hello(mode, token))
        .await
        .map_err(|source| RelayError::Connect { relay, source })?;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(answer, stream.read_exact(&mut byte)).await {
        Ok(Ok(_)) => Ok((stream, byte[0])),
        Ok(Err(source)) => Err(RelayError::Connect { relay, source }),
        Err(_) => Err(RelayError::TimedOut(relay)),
    }
}

/// How long a client waits for TCP to a relay.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Relayed handshakes under way at once on one node: a relay (or whoever knows a token) can
/// pair us as fast as we register, so registering again waits for a place.
pub const RELAYED_HANDSHAKES: usize = 8;

/// Keeps one registration waiting on `relay` under `token` until `cancel` fires: each pairing
/// becomes a connection (we are the responder), and a new registration takes its place once a
/// handshake place is free. A failed or refused registration is retried after a backoff
/// (1 s doubling to 60 s; back to 1 s after a registration that lived a minute).
pub(crate) async fn keep_waiting(
    relay: SocketAddr,
    token: [u8; 32],
    identity: crate::net::Identity,
    tx: crate::net::InboundSender,
    places: Arc<tokio::sync::Semaphore>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let place = tokio::select! {
            _ = cancel.cancelled() => return,
            p = places.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let since = Instant::now();
        // The relay holds a waiter for its own `wait` (10 min by default); past a little more,
        // the registration is dead without our having noticed.
        let met = tokio::select! {
            _ = cancel.cancelled() => return,
            m = meet(relay, WAIT, &token, RelayLimits::default().wait + Duration::from_secs(60)) => m,
        };
        match met {
            Ok((stream, PAIRED_RESPONDER)) => {
                backoff = Duration::from_secs(1);
                tokio::spawn(crate::net::run_connection(
                    stream,
                    relay,
                    identity.clone(),
                    false,
                    true,
                    tx.clone(),
                    cancel.child_token(),
                    Some(place),
                ));
                continue;
            }
            _ => drop(place),
        }
        if since.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// One dial through `relay` under `token`: a connection as the initiator, or
/// [`crate::net::Inbound::RelayFailed`].
pub(crate) async fn dial(
    relay: SocketAddr,
    token: [u8; 32],
    identity: crate::net::Identity,
    tx: crate::net::InboundSender,
    cancel: CancellationToken,
) {
    let met = tokio::select! {
        _ = cancel.cancelled() => return,
        m = meet(relay, DIAL, &token, CONNECT_TIMEOUT) => m,
    };
    let error = match met {
        Ok((stream, PAIRED_INITIATOR)) => {
            crate::net::run_connection::<()>(stream, relay, identity, true, true, tx, cancel, None)
                .await;
            return;
        }
        Ok((_, NOBODY_WAITING)) => RelayError::NobodyWaiting(relay),
        Ok(_) => RelayError::Refused(relay),
        Err(e) => e,
    };
    let _ = tx.try_send(crate::net::Inbound::RelayFailed {
        relay,
        error: error.to_string(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn relay(limits: RelayLimits) -> (SocketAddr, Arc<RelayStats>, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stats, cancel) = (Arc::new(RelayStats::default()), CancellationToken::new());
        tokio::spawn(serve(listener, limits, stats.clone(), cancel.clone()));
        (addr, stats, cancel)
    }

    /// A hello with an explicit session tag (the real one is per process).
    async fn hello_as(relay: SocketAddr, mode: u8, token: [u8; 32], session: u8) -> TcpStream {
        let mut s = TcpStream::connect(relay).await.unwrap();
        let mut h = hello(mode, &token);
        h[41..].copy_from_slice(&[session; 8]);
        s.write_all(&h).await.unwrap();
        s
    }

    async fn answer(s: &mut TcpStream) -> Option<u8> {
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(1)) => Some(b[0]),
            _ => None,
        }
    }

    #[tokio::test]
    async fn pairs_a_dialler_with_a_waiter_and_forwards_both_ways() {
        let (addr, stats, cancel) = relay(RelayLimits::default()).await;
        let token = [1u8; 32];
        let mut w = hello_as(addr, WAIT, token, 1).await;
        // Nobody for another token; and a waiter is never paired with its own process.
        let mut other = hello_as(addr, DIAL, [2u8; 32], 2).await;
        assert_eq!(answer(&mut other).await, Some(NOBODY_WAITING));
        let mut own = hello_as(addr, DIAL, token, 1).await;
        assert_eq!(answer(&mut own).await, Some(NOBODY_WAITING));
        let mut d = hello_as(addr, DIAL, token, 3).await;
        assert_eq!(answer(&mut d).await, Some(PAIRED_INITIATOR));
        assert_eq!(answer(&mut w).await, Some(PAIRED_RESPONDER));
        d.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        w.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        w.write_all(b"pong").await.unwrap();
        d.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        assert_eq!(stats.paired.load(Ordering::Relaxed), 1);
        // One side closing ends the pair.
        drop(w);
        assert_eq!(answer(&mut d).await, None);
        cancel.cancel();
    }

    #[tokio::test]
    async fn caps_turn_connections_away() {
        let limits = RelayLimits {
            max_per_ip: 2,
            max_waiting_per_token: 1,
            ..Default::default()
        };
        let (addr, stats, cancel) = relay(limits).await;
        let _w1 = hello_as(addr, WAIT, [1u8; 32], 1).await;
        // A second waiter under the same token is over `max_waiting_per_token`.
        let mut w2 = hello_as(addr, WAIT, [1u8; 32], 2).await;
        assert_eq!(answer(&mut w2).await, Some(REFUSED));
        drop(w2);
        // Two held from this address (the refused one's slot comes back when it closes).
        let _w3 = hello_as(addr, WAIT, [3u8; 32], 3).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut w4 = hello_as(addr, WAIT, [4u8; 32], 4).await;
            if answer(&mut w4).await == Some(REFUSED) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a third connection from one address held"
            );
        }
        assert!(stats.refused.load(Ordering::Relaxed) >= 2);
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_pair_holds_a_place_for_each_end() {
        let limits = RelayLimits {
            max_per_ip: 2,
            ..Default::default()
        };
        let (addr, _stats, cancel) = relay(limits).await;
        let mut w = hello_as(addr, WAIT, [1u8; 32], 1).await;
        let mut d = hello_as(addr, DIAL, [1u8; 32], 2).await;
        assert_eq!(answer(&mut d).await, Some(PAIRED_INITIATOR));
        assert_eq!(answer(&mut w).await, Some(PAIRED_RESPONDER));
        // The pair is two connections from this address: a third is over the cap.
        let mut third = hello_as(addr, WAIT, [3u8; 32], 3).await;
        assert_eq!(answer(&mut third).await, Some(REFUSED));
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_waiter_that_speaks_out_of_turn_or_a_bad_hello_is_cut() {
        let (addr, _stats, cancel) = relay(RelayLimits::default()).await;
        let mut w = hello_as(addr, WAIT, [1u8; 32], 1).await;
        w.write_all(b"x").await.unwrap();
        assert_eq!(answer(&mut w).await, None, "cut");
        // ...and it is no longer waiting: a dialler finds nobody.
        let mut d = hello_as(addr, DIAL, [1u8; 32], 2).await;
        assert_eq!(answer(&mut d).await, Some(NOBODY_WAITING));
        let mut bad = TcpStream::connect(addr).await.unwrap();
        bad.write_all(&[0u8; HELLO_LEN]).await.unwrap();
        assert_eq!(answer(&mut bad).await, None, "a wrong magic is closed");
        cancel.cancel();
    }

    #[tokio::test]
    async fn an_idle_pair_is_closed() {
        let limits = RelayLimits {
            idle: Duration::from_millis(300),
            ..Default::default()
        };
        let (addr, _stats, cancel) = relay(limits).await;
        let mut w = hello_as(addr, WAIT, [1u8; 32], 1).await;
        let mut d = hello_as(addr, DIAL, [1u8; 32], 2).await;
        assert_eq!(answer(&mut d).await, Some(PAIRED_INITIATOR));
        assert_eq!(answer(&mut w).await, Some(PAIRED_RESPONDER));
        // Nothing moves: both ends see the close (the read ends well before its 10 s bound).
        assert_eq!(answer(&mut d).await, None);
        assert_eq!(answer(&mut w).await, None);
        cancel.cancel();
    }

    #[test]
    fn the_bucket_paces_bytes_at_its_rate() {
        let mut b = Bucket::new(100_000);
        // The burst goes at once, then a wait in proportion to what is missing.
        assert_eq!(b.take(PUMP_BUF), None);
        let wait = b.take(50_000).expect("over the burst");
        assert!(wait > Duration::from_millis(300) && wait <= Duration::from_millis(500));
    }
}
