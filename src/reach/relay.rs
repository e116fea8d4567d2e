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
//! node with its own registration (the tag lets the relay tell one process's registrations
//! apart from another's behind the same address, and follow them across an address change
//! while the process lives). The relay answers one byte:
//! - [`PAIRED_RESPONDER`] to the waiting side and [`PAIRED_INITIATOR`] to the dialling side once
//!   it has paired them (each then runs the ordinary handshake in that role);
//! - [`NOBODY_WAITING`] to a dialler when no one waits under its token;
//! - [`REFUSED`] when a cap is reached.
//!
//! After the pairing byte, the stream is the peer's: every byte is forwarded as it is.
//!
//! **Caps** ([`RelayLimits`]): connections in all and per source address (an IPv6 /64 counts
//! as one), waiters per token (a full queue closes its oldest) and per token and source
//! ([`WAITING_PER_SOURCE`]), a byte rate per pair (both directions together), an idle timeout
//! per pair, a lifetime for an unpaired waiter and a deadline for the hello. A pair holds a
//! place for each end. A client that sends anything after its hello while it waits is cut.
//! Nothing a client sends sizes an allocation: the hello is fixed-size. TCP keepalive runs on
//! every connection, so a registration that carries no byte keeps its NAT mapping.

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
/// Waiters held per token from one source address: one process per host is the common case,
/// two allow a restart's overlap.
pub const WAITING_PER_SOURCE: usize = 2;
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
            wait: Duration::from_secs(120),
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
    /// Its source (as counted for the per-address cap).
    ip: IpAddr,
    /// Takes the dialler's stream and its place in the counts; the waiter's task answers
    /// both and runs the pair (so a pair holds two places until it ends).
    give: oneshot::Sender<(TcpStream, Slot)>,
}

/// One connection's place in the relay's counts (in all and per source, see
/// [`crate::net::Gate`]); given back on drop.
type Slot = crate::net::Pass;

/// The waiters, per token.
#[derive(Default)]
struct State {
    waiting: HashMap<[u8; 32], VecDeque<Waiter>>,
    next_id: u64,
}

impl State {
    /// Takes the oldest waiter under `token` that is not of process `session`.
    fn take_waiter(&mut self, token: &[u8; 32], session: [u8; 8]) -> Option<Waiter> {
        let q = self.waiting.get_mut(token)?;
        let w = q
            .iter()
            .position(|w| w.session != session)
            .and_then(|at| q.remove(at));
        self.tidy(token);
        w
    }

    /// Forgets waiter `id` under `token` (if it is still there).
    fn forget_waiter(&mut self, token: &[u8; 32], id: u64) {
        if let Some(q) = self.waiting.get_mut(token) {
            q.retain(|w| w.id != id);
        }
        self.tidy(token);
    }

    /// A token nobody waits under takes no room.
    fn tidy(&mut self, token: &[u8; 32]) {
        if self.waiting.get(token).is_some_and(VecDeque::is_empty) {
            self.waiting.remove(token);
        }
    }
}

/// The state, even after a panic elsewhere (each update leaves it consistent).
fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves the relay on `listener` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    limits: RelayLimits,
    stats: Arc<RelayStats>,
    cancel: CancellationToken,
) {
    let state = Arc::new(Mutex::new(State::default()));
    // An IPv6 host holds a whole /64: the gate counts it as one source.
    let gate = Arc::new(crate::net::Gate::new(
        limits.max_connections,
        limits.max_per_ip,
    ));
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
        let Some(slot) = gate.enter(from.ip()) else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            // Best effort, never waited on: the answer fits any socket buffer.
            let _ = stream.try_write(&[REFUSED]);
            continue;
        };
        let _ = stream.set_nodelay(true);
        keepalive(&stream);
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
                // The oldest waiter that is not the dialler's own process.
                let waiter = lock(&state).take_waiter(&token, session);
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
        let mut s = lock(&state);
        let id = s.next_id;
        s.next_id += 1;
        let ip = slot.source();
        let queue = s.waiting.entry(token).or_default();
        if queue.iter().filter(|w| w.ip == ip).count() >= WAITING_PER_SOURCE {
            None
        } else {
            // A full queue makes room by closing its oldest waiter (it registers again): a
            // squatter holding every place under a token cannot keep its owner out.
            if queue.len() >= limits.max_waiting_per_token.max(1) {
                queue.pop_front();
            }
            queue.push_back(Waiter {
                id,
                session,
                ip,
                give,
            });
            Some(id)
        }
    };
    let Some(id) = id else {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        let _ = stream.write_all(&[REFUSED]).await;
        return;
    };
    let mut probe = [0u8; 1];
    let mut take = take;
    let dialler = tokio::select! {
        _ = cancel.cancelled() => None,
        _ = tokio::time::sleep(limits.wait) => None,
        // A waiter has nothing to say before it is paired: any byte or EOF ends it.
        _ = stream.read(&mut probe) => None,
        // Err: evicted to make room.
        d = &mut take => d.ok(),
    };
    let Some((mut dialler, dialler_slot)) = dialler else {
        lock(&state).forget_waiter(&token, id);
        // A dialler handed over just as this waiter ended is told, not dropped unanswered.
        take.close();
        if let Ok((mut d, _slot)) = take.try_recv() {
            let _ = d.write_all(&[NOBODY_WAITING]).await;
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
    keepalive(&stream);
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
/// pair us as fast as we register, so a pairing waits for a place before its handshake.
pub const RELAYED_HANDSHAKES: usize = 8;

/// How long a waiting client waits for its relay's answer before it registers again: longer
/// than a relay's [`RelayLimits::wait`] (the relay closes first), short enough that a
/// registration lost without a close (a NAT forgetting the connection) is not lost for long.
pub const REGISTRATION_LIFETIME: Duration = Duration::from_secs(180);

/// TCP keepalive on relay connections: idle 30 s, then probes every 10 s, so a registration
/// (which carries no byte while it waits) keeps its NAT mapping and a dead one is noticed.
fn keepalive(stream: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    // Best effort: without it, the registration lifetime still bounds a dead registration.
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&ka);
}

/// A relayed handshake's place: a permit of the node's ration, and who to tell how it ended.
struct Place {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    tell: Option<oneshot::Sender<bool>>,
}

impl crate::net::HandshakeSlot for Place {
    fn finished(mut self, ok: bool) {
        if let Some(t) = self.tell.take() {
            let _ = t.send(ok);
        }
    }
}

/// Keeps one registration waiting on `relay` under `token` until `stop` fires: each pairing
/// becomes a connection (we are the responder; it lives until `conns` fires), and a new
/// registration takes its place once that handshake has succeeded. A registration that fails,
/// is refused, or whose pairing fails its handshake (a relay, or anyone with the token, pairing
/// us in a loop) is retried after a backoff: 1 s doubling to 60 s, back to 1 s after a
/// registration that lived a minute or a handshake that succeeded.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn keep_waiting(
    relay: SocketAddr,
    token: [u8; 32],
    identity: crate::net::Identity,
    tx: crate::net::InboundSender,
    places: Arc<tokio::sync::Semaphore>,
    stop: CancellationToken,
    conns: CancellationToken,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let since = Instant::now();
        let met = tokio::select! {
            _ = stop.cancelled() => return,
            m = meet(relay, WAIT, &token, REGISTRATION_LIFETIME) => m,
        };
        if let Ok((stream, PAIRED_RESPONDER)) = met {
            let permit = tokio::select! {
                _ = stop.cancelled() => return,
                p = places.clone().acquire_owned() => p.ok(),
            };
            let (tell, told) = oneshot::channel();
            tokio::spawn(crate::net::run_connection(
                stream,
                relay,
                identity.clone(),
                false,
                true,
                tx.clone(),
                conns.child_token(),
                Some(Place {
                    _permit: permit,
                    tell: Some(tell),
                }),
            ));
            // The handshake is bounded by its own timeout.
            let ok = tokio::select! {
                _ = stop.cancelled() => return,
                r = told => r.unwrap_or(false),
            };
            if ok {
                backoff = Duration::from_secs(1);
                continue;
            }
        }
        if since.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// Clears a flag when dropped: "a relayed dial is under way" (one at a time per node, so that
/// two relayed connections to one peer never race each other).
pub(crate) struct InFlight(pub(crate) Arc<std::sync::atomic::AtomicBool>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl crate::net::HandshakeSlot for InFlight {
    fn finished(self, _ok: bool) {}
}

/// One dial through `relay` under `token`: a connection as the initiator, or
/// [`crate::net::Inbound::RelayFailed`]. `in_flight` is cleared once the handshake is over.
pub(crate) async fn dial(
    relay: SocketAddr,
    token: [u8; 32],
    identity: crate::net::Identity,
    tx: crate::net::InboundSender,
    cancel: CancellationToken,
    in_flight: InFlight,
) {
    let met = tokio::select! {
        _ = cancel.cancelled() => return,
        m = meet(relay, DIAL, &token, CONNECT_TIMEOUT) => m,
    };
    let error = match met {
        Ok((stream, PAIRED_INITIATOR)) => {
            crate::net::run_connection(
                stream,
                relay,
                identity,
                true,
                true,
                tx,
                cancel,
                Some(in_flight),
            )
            .await;
            return;
        }
        Ok((_, NOBODY_WAITING)) => RelayError::NobodyWaiting(relay),
        Ok(_) => RelayError::Refused(relay),
        Err(e) => e,
    };
    drop(in_flight);
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

    /// A waiter and a dialler under `token`, paired (each told its role).
    async fn paired(relay: SocketAddr, token: [u8; 32]) -> (TcpStream, TcpStream) {
        let mut w = hello_as(relay, WAIT, token, 1).await;
        let mut d = hello_as(relay, DIAL, token, 2).await;
        assert_eq!(answer(&mut d).await, Some(PAIRED_INITIATOR));
        assert_eq!(answer(&mut w).await, Some(PAIRED_RESPONDER));
        (w, d)
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
        // Per address: two held, the third refused.
        let limits = RelayLimits {
            max_per_ip: 2,
            ..Default::default()
        };
        let (addr, stats, cancel) = relay(limits).await;
        let _w1 = hello_as(addr, WAIT, [1u8; 32], 1).await;
        let _w2 = hello_as(addr, WAIT, [2u8; 32], 2).await;
        let mut w3 = hello_as(addr, WAIT, [3u8; 32], 3).await;
        assert_eq!(answer(&mut w3).await, Some(REFUSED));
        assert_eq!(stats.refused.load(Ordering::Relaxed), 1);
        cancel.cancel();
        // Per token and address: two waiters, the third refused.
        let (addr, _stats, cancel) = relay(RelayLimits::default()).await;
        let _w1 = hello_as(addr, WAIT, [1u8; 32], 1).await;
        let _w2 = hello_as(addr, WAIT, [1u8; 32], 2).await;
        let mut w3 = hello_as(addr, WAIT, [1u8; 32], 3).await;
        assert_eq!(answer(&mut w3).await, Some(REFUSED));
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_full_queue_closes_its_oldest_waiter_so_squatters_cannot_keep_the_owner_out() {
        let limits = RelayLimits {
            max_waiting_per_token: 1,
            ..Default::default()
        };
        let (addr, _stats, cancel) = relay(limits).await;
        let mut squatter = hello_as(addr, WAIT, [1u8; 32], 1).await;
        let mut owner = hello_as(addr, WAIT, [1u8; 32], 2).await;
        assert_eq!(answer(&mut squatter).await, None, "the oldest is closed");
        let mut d = hello_as(addr, DIAL, [1u8; 32], 3).await;
        assert_eq!(answer(&mut d).await, Some(PAIRED_INITIATOR));
        assert_eq!(answer(&mut owner).await, Some(PAIRED_RESPONDER));
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_pair_holds_a_place_for_each_end() {
        let limits = RelayLimits {
            max_per_ip: 2,
            ..Default::default()
        };
        let (addr, _stats, cancel) = relay(limits).await;
        let _pair = paired(addr, [1u8; 32]).await;
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
        let (mut w, mut d) = paired(addr, [1u8; 32]).await;
        // Nothing moves: both ends see the close (the read ends well before its 10 s bound).
        assert_eq!(answer(&mut d).await, None);
        assert_eq!(answer(&mut w).await, None);
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_relay_that_pairs_us_with_nobody_real_meets_a_backoff_not_a_loop() {
        // A hostile relay: answers every registration "paired" and closes at once.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::Relaxed);
                let mut h = [0u8; HELLO_LEN];
                if s.read_exact(&mut h).await.is_ok() {
                    let _ = s.write_all(&[PAIRED_RESPONDER]).await;
                }
            }
        });
        let (tx, _rx) = crossbeam_channel::bounded(64);
        let stop = CancellationToken::new();
        let places = Arc::new(tokio::sync::Semaphore::new(RELAYED_HANDSHAKES));
        tokio::spawn(keep_waiting(
            addr,
            [1u8; 32],
            crate::net::Identity::generate(),
            tx,
            places,
            stop.clone(),
            CancellationToken::new(),
        ));
        // Backoff 1 s, 2 s: three registrations in 2.5 s at most (a loop would make hundreds).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        stop.cancel();
        let n = count.load(Ordering::Relaxed);
        assert!((1..=3).contains(&n), "{n} registrations in 2.5 s");
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
