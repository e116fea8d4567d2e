//! The transport: TCP connections, each encrypted and authenticated with a Noise handshake
//! between node identity keys, carrying protocol frames. Bytes and frames only — every protocol
//! decision is the replicator's.
//!
//! # Layout
//! - [`Identity`]: a node's static X25519 key pair (its identity on the wire).
//! - [`listen`], [`dial`]: make connections; each becomes a reader task and a writer task.
//! - [`Inbound`]: what connections report to the synchronizer's one inbound channel.
//! - [`DialError`], [`HandshakeError`]: why a connection did not come up (a failed dial is
//!   reported to the synchronizer, which tells the user and backs off).
//!
//! # Wire
//! `Noise_XX_25519_ChaChaPoly_BLAKE2s` (chosen by measurement: `cargo bench --bench noise`,
//! ~1.23 GB/s per core here against ~1.10 GB/s for AES-GCM), prologue `feedsync/1`. Every Noise
//! message travels with a 2-byte big-endian length (tokio-util's `LengthDelimitedCodec`). After
//! the handshake the decrypted payloads form one byte stream of protocol frames (`protocol/SPEC.md`
//! § 3), so a frame of up to 2 MiB spans several Noise messages. The frame length is checked
//! before its body is buffered.
//!
//! # Bounds
//! Every queue is bounded. Inbound messages go into the synchronizer's channel with backpressure
//! (the reader stops reading that socket while the channel is full), and each connection the
//! synchronizer admitted may have at most [`INBOUND_BUDGET`] bytes and [`INBOUND_MESSAGES`]
//! messages waiting there (past either, its reader stops reading until the loop catches up), so
//! one peer's flood cannot fill the channel for everyone. Outbound queues are bounded
//! per connection and the synchronizer refuses to grow them: a peer too slow to drain its queue is
//! cut, never allowed to stall the loop or grow memory. A connection that does not finish its
//! handshake within [`HANDSHAKE_TIMEOUT`] is closed.
//!
//! # Strangers
//! Anyone who can reach the port can open connections, so handshakes are rationed before a byte
//! of cryptography is spent on them: a listener keeps at most [`MAX_HANDSHAKES`] unfinished
//! handshakes, at most [`MAX_HANDSHAKES_PER_SOURCE`] from one source (an IPv4 address or an IPv6
//! /64); a connection beyond either is closed at once. The first handshake message must come
//! within [`FIRST_MESSAGE_TIMEOUT`] (an idle connect holds a descriptor only that long), and a
//! handshake message may be at most [`HANDSHAKE_MESSAGE_MAX`] bytes (ours carry no payload), so
//! an unfinished handshake holds a few KiB, not two 64 KiB buffers. Key exchanges run on
//! tokio's blocking pool, at most [`KEY_EXCHANGES`] at once, so a burst of handshakes never
//! starves the one worker that encrypts and decrypts every live connection.
//!
//! Nothing here prints: every outcome is an [`Inbound`] for the synchronizer to act on and report.

use bytes::{Bytes, BytesMut};
use feedsync_protocol::{MAX_FRAME_LEN, Message, decode, encode_into, frame_header};
use futures_util::StreamExt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, FramedParts, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

mod handshake;

pub use handshake::raise_descriptor_limit;
pub(crate) use handshake::{Gate, Pass};
use handshake::{handshake, handshake_codec};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// The Noise prologue: binds the handshake to this protocol.
pub const PROLOGUE: &[u8] = b"feedsync/1";
/// Largest Noise message (the Noise spec's limit).
const NOISE_MAX: usize = 65535;
/// Largest plaintext per Noise message (16 bytes of tag).
const NOISE_PLAIN_MAX: usize = NOISE_MAX - 16;
/// A connection must complete its handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages one connection may have queued for sending.
pub const OUTBOUND_QUEUE: usize = 256;
/// The first handshake message must arrive within this time after a connection is accepted.
pub const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(3);
/// Unfinished handshakes one listener keeps at most.
pub const MAX_HANDSHAKES: usize = 128;
/// Unfinished handshakes from one source (IPv4 address, IPv6 /64) a listener keeps at most.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 8;
/// Largest handshake message accepted (an XX message without payload is under 100 bytes).
pub const HANDSHAKE_MESSAGE_MAX: usize = 1024;
/// Key exchanges computed at once in the whole process.
pub const KEY_EXCHANGES: usize = 4;

/// Shared between the synchronizer and a connection's writer task.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Block bytes queued and not yet written: the synchronizer adds [`payload_len`] when it
    /// queues a message, the writer subtracts it once written.
    pub queued: AtomicUsize,
    /// Batches written to the socket so far (the synchronizer watches it for progress).
    pub writes: AtomicU64,
    /// Block bytes written to the socket so far (the upload budget follows its rate).
    pub written: AtomicU64,
    /// Bytes (by [`message_cost`]) of this connection's messages handed to the synchronizer and
    /// not handled yet; the synchronizer gives them back with [`ConnStats::handled`].
    pub inbound: AtomicUsize,
    /// Messages of this connection handed over and not handled yet.
    pub inbound_messages: AtomicUsize,
    /// The budget for `inbound` (and [`INBOUND_MESSAGES`] for `inbound_messages`): past it the
    /// reader stops reading this socket until the synchronizer catches up, so one peer's flood
    /// holds a bounded share of the inbound queue and of memory. 0, the default, means no budget,
    /// for a consumer that never calls [`ConnStats::handled`].
    pub inbound_budget: AtomicUsize,
    /// Wakes the reader when the synchronizer handled something.
    room: tokio::sync::Notify,
}

/// The inbound byte budget the synchronizer gives each admitted connection.
pub const INBOUND_BUDGET: usize = 4 * 1024 * 1024;
/// Messages one budgeted connection may have waiting in the inbound queue.
pub const INBOUND_MESSAGES: usize = 512;

impl ConnStats {
    /// The synchronizer handled one message of this connection that cost `cost`.
    pub fn handled(&self, cost: usize) {
        let sub = |a: &AtomicUsize, n: usize| {
            let _ = a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n))
            });
        };
        sub(&self.inbound, cost);
        sub(&self.inbound_messages, 1);
        self.room.notify_one();
    }

    /// Whether handing over one more message of `cost` would exceed the budget. One message is
    /// always let through when none is waiting, however large (a frame is at most 2 MiB).
    fn over_budget(&self, cost: usize) -> bool {
        let budget = self.inbound_budget.load(Ordering::Acquire);
        let waiting = self.inbound_messages.load(Ordering::Acquire);
        budget != 0
            && waiting > 0
            && (waiting >= INBOUND_MESSAGES
                || self.inbound.load(Ordering::Acquire).saturating_add(cost) > budget)
    }
}

/// What a message holds of our memory while it waits in a queue: the enum plus its heap parts.
pub fn message_cost(m: &Message) -> usize {
    use feedsync_protocol::BlockSet;
    let runs = |b: &BlockSet| match b {
        BlockSet::Runs { runs, .. } => runs.len() * std::mem::size_of::<u64>(),
        _ => 0,
    };
    let heap = match m {
        Message::Have(h) | Message::Unhave(h) => runs(&h.blocks),
        Message::Want(w) | Message::Unwant(w) => runs(&w.blocks),
        _ => payload_len(m),
    };
    std::mem::size_of::<Message>() + heap
}

/// Bytes of block data a message carries (what the outbound byte budget counts).
pub fn payload_len(m: &Message) -> usize {
    match m {
        Message::Data(d) => d.blocks.iter().map(|b| b.0.len()).sum::<usize>() + d.nodes.len() * 48,
        _ => 0,
    }
}

/// Why a Noise handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The Noise state machine refused a message (wrong protocol, tampering, bad key).
    #[error("Noise handshake failed: {0}")]
    Noise(#[from] snow::Error),
    /// The socket failed while handshaking.
    #[error("I/O error during the handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection before the handshake finished.
    #[error("closed during the handshake")]
    Closed,
    /// The handshake finished without the peer's static key (cannot happen with XX).
    #[error("the peer sent no static key")]
    NoStaticKey,
    /// The handshake did not finish within [`HANDSHAKE_TIMEOUT`].
    #[error("the handshake timed out")]
    TimedOut,
    /// A key exchange task failed (a bug in the Noise library; the connection is dropped).
    #[error("the key exchange failed to run")]
    KeyExchange,
}

/// Why a dial did not give a connection.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP connect failed (connection refused, unreachable, ...).
    #[error("{0}")]
    Connect(std::io::Error),
    /// TCP connect did not finish within [`HANDSHAKE_TIMEOUT`].
    #[error("connect timed out")]
    ConnectTimedOut,
    /// TCP connected, the Noise handshake did not.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

/// Identifies one connection (not one peer: a peer may reconnect).
pub type ConnId = u64;

/// A node's static Noise key pair.
#[derive(Clone)]
pub struct Identity {
    private: [u8; 32],
    /// The public key: the node's id on the wire.
    pub public: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", blake3::Hash::from(self.public).to_hex())
    }
}

impl Identity {
    /// A fresh identity.
    pub fn generate() -> Self {
        let params = NOISE_PARAMS
            .parse()
            .expect("constant Noise parameters parse");
        // Only fails if the OS random source fails, which nothing can recover from.
        let kp = snow::Builder::new(params)
            .generate_keypair()
            .expect("generating a key pair");
        let mut private = [0u8; 32];
        let mut public = [0u8; 32];
        private.copy_from_slice(&kp.private);
        public.copy_from_slice(&kp.public);
        Self { private, public }
    }

    /// Loads the identity stored at `path`, or creates one there (mode 0600).
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) if bytes.len() == 64 => {
                let mut private = [0u8; 32];
                let mut public = [0u8; 32];
                private.copy_from_slice(&bytes[..32]);
                public.copy_from_slice(&bytes[32..]);
                Ok(Self { private, public })
            }
            Ok(_) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: node identity file is not 64 bytes", path.display()),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Self::generate();
                let mut bytes = id.private.to_vec();
                bytes.extend_from_slice(&id.public);
                // Owner-only: the private half is the node's identity.
                crate::util::write_atomic_with_mode(path, &bytes, 0o600)?;
                Ok(id)
            }
            Err(e) => Err(e),
        }
    }
}

/// What connections tell the synchronizer, through its one inbound channel.
#[derive(Debug)]
pub enum Inbound {
    /// A connection finished its handshake.
    Connected {
        /// This connection.
        conn: ConnId,
        /// The remote node's static public key (its identity).
        remote: [u8; 32],
        /// The Noise handshake hash, the same on both sides: capabilities are bound to it.
        handshake_hash: Vec<u8>,
        /// We dialled (through a relay: the relay made us the initiator).
        initiator: bool,
        /// The remote address (through a relay: the relay's).
        addr: SocketAddr,
        /// The connection runs through a blind relay (`reach::relay`): the handshake and
        /// everything after it are end to end, but a direct path is preferred when one appears.
        relayed: bool,
        /// Where to put messages for this connection.
        outbound: mpsc::Sender<Message>,
        /// How much is queued on `outbound` and how much has been written, shared with the
        /// connection's writer.
        stats: Arc<ConnStats>,
        /// Cancelling it closes the connection at once, even while a write is blocked.
        cancel: CancellationToken,
    },
    /// A message arrived.
    Message {
        /// The connection.
        conn: ConnId,
        /// The message.
        message: Message,
        /// What it counts against the connection's inbound budget ([`message_cost`]): the
        /// synchronizer gives exactly this back when it has handled the message.
        cost: usize,
    },
    /// The connection sent everything queued for it: the synchronizer may queue more answers.
    /// Without this, a drained connection would idle until some other event woke the loop.
    Writable {
        /// The connection.
        conn: ConnId,
    },
    /// The connection ended (`error` says why, when it was not a clean close).
    Disconnected {
        /// The connection.
        conn: ConnId,
        /// Why, if not a clean close.
        error: Option<String>,
    },
    /// A dial through a relay came to nothing (nobody waiting, the relay unreachable or full).
    /// Relayed dials are retried on the synchronizer's own schedule, not the peer book's.
    RelayFailed {
        /// The relay.
        relay: SocketAddr,
        /// Why.
        error: String,
    },
    /// A dial failed.
    DialFailed {
        /// The address dialled.
        addr: SocketAddr,
        /// Why.
        error: DialError,
    },
}

/// The sending half of the synchronizer's inbound channel.
pub type InboundSender = crossbeam_channel::Sender<Inbound>;

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

type Wire = Framed<TcpStream, LengthDelimitedCodec>;

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(2)
        .max_frame_length(NOISE_MAX)
        .new_codec()
}

/// Hands `item` to the synchronizer, waiting (without blocking the runtime) while its channel is
/// full: a full channel means the loop is busy, so this connection stops reading until it is not.
async fn deliver(tx: &InboundSender, mut item: Inbound, cancel: &CancellationToken) -> bool {
    loop {
        match tx.try_send(item) {
            Ok(()) => return true,
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => return false,
            Err(crossbeam_channel::TrySendError::Full(back)) => {
                item = back;
                tokio::select! {
                    _ = cancel.cancelled() => return false,
                    _ = tokio::time::sleep(Duration::from_micros(200)) => {}
                }
            }
        }
    }
}

/// A place in some ration of handshakes (the listener's gate, the relay client's), told how
/// the handshake ended when it is over; dropping it unused means the handshake never ended
/// (the node stopped).
pub(crate) trait HandshakeSlot: Send {
    /// The handshake succeeded (`ok`) or failed; the place is given back.
    fn finished(self, ok: bool);
}

impl HandshakeSlot for () {
    fn finished(self, _ok: bool) {}
}

impl HandshakeSlot for handshake::Pass {
    fn finished(self, _ok: bool) {}
}

/// Runs one connection after TCP is up: handshake, then a reader and a writer until either side
/// ends or `cancel` fires. `pass` is told how the handshake ended, and so given back.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_connection<P: HandshakeSlot>(
    stream: TcpStream,
    addr: SocketAddr,
    identity: Identity,
    initiator: bool,
    relayed: bool,
    tx: InboundSender,
    cancel: CancellationToken,
    pass: Option<P>,
) {
    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_nodelay(true);
    limit_unsent(&stream);
    // Handshake messages are small: a stranger may not make us buffer 64 KiB frames.
    let mut wire = Framed::new(stream, handshake_codec());
    let shaken = tokio::select! {
        _ = cancel.cancelled() => return,
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut wire, &identity, initiator)) => r,
    };
    let result = shaken.unwrap_or(Err(HandshakeError::TimedOut));
    // The handshake is over either way: its place goes to the next one.
    if let Some(p) = pass {
        p.finished(result.is_ok());
    }
    let (transport, handshake_hash, remote) = match result {
        Ok(t) => t,
        Err(e) => {
            // An inbound connection that fails its handshake is just closed; a dial is reported
            // so that the peer book can back off and the user learns why.
            if initiator {
                let error = DialError::Handshake(e);
                let _ = deliver(&tx, Inbound::DialFailed { addr, error }, &cancel).await;
            }
            return;
        }
    };
    let transport = Arc::new(transport);
    let (out_tx, out_rx) = mpsc::channel(OUTBOUND_QUEUE);
    let stats = Arc::new(ConnStats::default());
    let conn_cancel = cancel.child_token();
    let connected = Inbound::Connected {
        conn,
        remote,
        handshake_hash,
        initiator,
        addr,
        relayed,
        outbound: out_tx,
        stats: stats.clone(),
        cancel: conn_cancel.clone(),
    };
    if !deliver(&tx, connected, &cancel).await {
        return;
    }
    // After the handshake: reads keep the codec (and whatever it already buffered); writes go
    // straight to the socket from one buffer holding length-prefixed ciphertexts, which saves
    // two copies of every block on the sending side.
    let parts = wire.into_parts();
    let (read_half, write_half) = parts.io.into_split();
    // `from_parts` marks bytes the handshake already buffered as ready to decode: a peer may
    // send its first messages in the same segment as its last handshake message and then wait.
    let mut read_parts = FramedParts::new::<Bytes>(read_half, codec());
    read_parts.read_buf = parts.read_buf;
    let stream = Framed::from_parts(read_parts);
    let writer = tokio::spawn(write_loop(
        write_half,
        out_rx,
        transport.clone(),
        conn_cancel.clone(),
        conn,
        tx.clone(),
        stats.clone(),
    ));
    let read_error = read_loop(stream, conn, transport, &tx, &stats, &conn_cancel).await;
    conn_cancel.cancel();
    // The first failure is the reason: a writer that failed cancelled the reader.
    let write_error = writer.await.unwrap_or(None);
    let error = write_error.or(read_error);
    let _ = deliver(&tx, Inbound::Disconnected { conn, error }, &cancel).await;
}

async fn read_loop(
    mut stream: Framed<OwnedReadHalf, LengthDelimitedCodec>,
    conn: ConnId,
    transport: Arc<snow::StatelessTransportState>,
    tx: &InboundSender,
    stats: &ConnStats,
    cancel: &CancellationToken,
) -> Option<String> {
    let mut nonce = 0u64;
    let mut buf = BytesMut::with_capacity(2 * NOISE_MAX);
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return None,
            m = stream.next() => m,
        };
        let msg = match msg {
            None => return None,
            Some(Err(e)) => return Some(e.to_string()),
            Some(Ok(m)) => m,
        };
        // Decrypt straight onto the end of the frame buffer.
        let start = buf.len();
        buf.resize(start + msg.len(), 0);
        let n = match transport.read_message(nonce, &msg, &mut buf[start..]) {
            Ok(n) => n,
            Err(e) => return Some(format!("decryption failed: {e}")),
        };
        buf.truncate(start + n);
        nonce += 1;
        // Peel off every complete frame; the length is checked before the body is waited for.
        loop {
            let (prefix, len) = match frame_header(&buf) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return Some(e.to_string()),
            };
            if buf.len() < prefix + len {
                buf.reserve(prefix + len - buf.len());
                break;
            }
            let frame = buf.split_to(prefix + len);
            let message = match decode(&frame[prefix..]) {
                Ok(m) => m,
                Err(e) => return Some(e.to_string()),
            };
            // Over its budget this connection waits (reading nothing more from its socket);
            // the others keep theirs.
            let cost = message_cost(&message);
            while stats.over_budget(cost) {
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = stats.room.notified() => {}
                }
            }
            stats.inbound.fetch_add(cost, Ordering::AcqRel);
            stats.inbound_messages.fetch_add(1, Ordering::AcqRel);
            if !deliver(
                tx,
                Inbound::Message {
                    conn,
                    message,
                    cost,
                },
                cancel,
            )
            .await
            {
                return None;
            }
        }
        debug_assert!(buf.len() <= MAX_FRAME_LEN + NOISE_MAX);
    }
}

async fn write_loop(
    mut socket: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Message>,
    transport: Arc<snow::StatelessTransportState>,
    cancel: CancellationToken,
    conn: ConnId,
    tx: InboundSender,
    stats: Arc<ConnStats>,
) -> Option<String> {
    let error = write_batches(&mut socket, &mut rx, &transport, &cancel, conn, &tx, &stats).await;
    if error.is_some() {
        // The connection is unusable: end the reader too, so the loop learns at once.
        cancel.cancel();
    }
    let _ = socket.shutdown().await;
    error
}

/// Unsent bytes the kernel may hold for one connection (`TCP_NOTSENT_LOWAT`).
///
/// Why: the upload budget (`core::pacing`) keeps what is queued for a connection near 100 ms of
/// what it drains, so that the uploader chooses each piece close to the wire and a request or a
/// `Have` does not wait behind seconds of blocks. Without this limit the kernel accepts writes
/// until its send buffer (autotuned up to `tcp_wmem`'s maximum, 4 MiB here) is full: the
/// writer's "written" would mean "copied into the kernel", the budget would measure the copy
/// rate, and the queue would simply move into the kernel. With it, the socket is writable only
/// while fewer than this many bytes wait to be sent (bytes in flight are not counted, so a long
/// fat link still fills its window); 128 KiB is the kernel's own suggestion for this option.
const NOTSENT_LOWAT: libc::c_int = 128 * 1024;

/// Sets [`NOTSENT_LOWAT`] on `stream`; a kernel without the option just keeps its default.
fn limit_unsent(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let value: libc::c_int = NOTSENT_LOWAT;
    // SAFETY: `setsockopt` reads exactly `size_of::<c_int>()` bytes from a pointer to a live
    // local `c_int`, on a file descriptor `stream` owns and keeps open for the whole call. No
    // safe wrapper offers this option (neither std, tokio, socket2 nor rustix have it).
    #[allow(unsafe_code)]
    let _ = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&value as *const libc::c_int).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Writes batches of queued messages until the queue closes, a goodbye is sent, `cancel` fires
/// (`None`), or something fails (the reason).
async fn write_batches(
    socket: &mut OwnedWriteHalf,
    rx: &mut mpsc::Receiver<Message>,
    transport: &snow::StatelessTransportState,
    cancel: &CancellationToken,
    conn: ConnId,
    tx: &InboundSender,
    stats: &ConnStats,
) -> Option<String> {
    let mut nonce = 0u64;
    let mut frames = Vec::with_capacity(256 * 1024);
    let mut wire = Vec::with_capacity(256 * 1024);
    let mut answers: Vec<Message> = Vec::new();
    let mut answers_bytes = 0usize;
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => return None,
            m = rx.recv() => m,
        };
        // The queue closed: a clean end.
        let first = first?;
        // Batch what is queued into one pass of encryption and one write, control messages
        // (requests, haves, cancels, pings) ahead of answers: a request or a `Have` must not
        // wait behind the blocks queued before it (`core::pacing`); a goodbye stays last.
        frames.clear();
        answers.clear();
        let mut goodbye = false;
        let mut batch_payload = 0;
        let mut next = Some(first);
        while let Some(m) = next {
            goodbye |= matches!(m, Message::Goodbye(_));
            let payload = payload_len(&m);
            batch_payload += payload;
            if matches!(
                m,
                Message::Data(_) | Message::NoData(_) | Message::Goodbye(_)
            ) {
                answers_bytes += payload;
                answers.push(m); // a goodbye ends the batch, so it stays last
            } else {
                // The replicator only emits messages within limits; a refusal here is a bug,
                // and the connection ends with it as the reason rather than silently skipping.
                if let Err(e) = encode_into(&m, &mut frames) {
                    return Some(format!("internal error: refused to encode a message: {e}"));
                }
            }
            next = if frames.len() + answers_bytes < 1024 * 1024 && !goodbye {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        answers_bytes = 0;
        for m in answers.drain(..) {
            if let Err(e) = encode_into(&m, &mut frames) {
                return Some(format!("internal error: refused to encode a message: {e}"));
            }
        }
        // Each Noise message: 2-byte big-endian length, then the ciphertext, encrypted in place
        // in the outgoing buffer.
        wire.clear();
        for chunk in frames.chunks(NOISE_PLAIN_MAX) {
            let at = wire.len();
            wire.resize(at + 2 + chunk.len() + 16, 0);
            let n = match transport.write_message(nonce, chunk, &mut wire[at + 2..]) {
                Ok(n) => n,
                Err(e) => return Some(format!("encryption failed: {e}")),
            };
            nonce += 1;
            wire[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
            wire.truncate(at + 2 + n);
        }
        let written = tokio::select! {
            _ = cancel.cancelled() => return None,
            r = socket.write_all(&wire) => r,
        };
        if let Err(e) = written {
            return Some(e.to_string());
        }
        stats.queued.fetch_sub(batch_payload, Ordering::AcqRel);
        stats
            .written
            .fetch_add(batch_payload as u64, Ordering::AcqRel);
        stats.writes.fetch_add(1, Ordering::AcqRel);
        // A goodbye is the last thing a connection says.
        if goodbye {
            return None;
        }
        // Drained: ask for more (best effort; a full inbound channel means the loop is awake).
        if rx.is_empty() {
            let _ = tx.try_send(Inbound::Writable { conn });
        }
    }
}

/// Accepts connections on `listener` until `cancel` fires; each runs as its own tasks.
///
/// `cancel` only stops accepting: connections already accepted live on until the synchronizer
/// closes them (the token in [`Inbound::Connected`]) or the runtime stops. An ordered shutdown
/// stops accepting first and then says goodbye to every peer, which a connection cancelled along
/// with the listener could not hear.
pub async fn listen(
    listener: TcpListener,
    identity: Identity,
    tx: InboundSender,
    cancel: CancellationToken,
) {
    let gate = Arc::new(Gate::handshakes());
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, addr)) => {
                // Past the handshake ration: closed at once (dropping the stream), before any
                // buffer or key exchange is spent on it.
                let Some(pass) = gate.enter(addr.ip()) else {
                    continue;
                };
                tokio::spawn(run_connection(
                    stream,
                    addr,
                    identity.clone(),
                    false,
                    false,
                    tx.clone(),
                    CancellationToken::new(),
                    Some(pass),
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await, // e.g. out of file descriptors
        }
    }
}

/// Dials `addr` (bounded by [`HANDSHAKE_TIMEOUT`]); the outcome arrives on `tx`.
pub async fn dial(
    addr: SocketAddr,
    identity: Identity,
    tx: InboundSender,
    cancel: CancellationToken,
) {
    let connected = tokio::select! {
        _ = cancel.cancelled() => return,
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr)) => r,
    };
    match connected {
        Ok(Ok(stream)) => {
            run_connection::<()>(stream, addr, identity, true, false, tx, cancel, None).await
        }
        Ok(Err(e)) => {
            let error = DialError::Connect(e);
            let _ = deliver(&tx, Inbound::DialFailed { addr, error }, &cancel).await;
        }
        Err(_) => {
            let error = DialError::ConnectTimedOut;
            let _ = deliver(&tx, Inbound::DialFailed { addr, error }, &cancel).await;
        }
    }
}
