//! The handshake and its ration: what a connection costs before we know who it is (see the
//! parent module's "Strangers").

use super::{
    FIRST_MESSAGE_TIMEOUT, HANDSHAKE_MESSAGE_MAX, HANDSHAKE_TIMEOUT, HandshakeError, Identity,
    KEY_EXCHANGES, MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE, NOISE_PARAMS, PROLOGUE, Wire,
};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio_util::codec::LengthDelimitedCodec;

/// Rations key exchanges across the process (see the module docs, "Strangers").
static KEY_EXCHANGE_PERMITS: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(KEY_EXCHANGES);

/// Raises this process's soft limit on open files to its hard limit, once per process; returns
/// `(from, to)` the first time it raised it. Every connection, stored file and socket takes a
/// descriptor, and a soft limit of 256 or 1,024 (common defaults) lets a burst of connections lock
/// out the store and the control socket. Failure leaves the limit as it was.
pub fn raise_descriptor_limit() -> Option<(u64, u64)> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    static DONE: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
    let once = DONE.get_or_init(|| {
        let limit = getrlimit(Resource::Nofile);
        let from = limit.current?;
        // "Unlimited" is refused for open files; 2^20 is Linux's default ceiling (nr_open).
        let to = limit.maximum.unwrap_or(1 << 20);
        if to <= from {
            return None;
        }
        let new = Rlimit {
            current: Some(to),
            maximum: limit.maximum,
        };
        setrlimit(Resource::Nofile, new).ok()?;
        Some((from, to))
    });
    let raised = *once;
    // Reported to the first caller only.
    static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if raised.is_some() && !REPORTED.swap(true, Ordering::AcqRel) {
        raised
    } else {
        None
    }
}

/// A ration of places (the unfinished handshakes of one listener; the connections of a relay),
/// in all and per source: [`Gate::enter`] hands out a [`Pass`] while both counts are under
/// their caps, and dropping the pass gives its place back.
#[derive(Debug)]
pub(crate) struct Gate {
    total: usize,
    per_source: usize,
    state: std::sync::Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    total: usize,
    per_source: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// One admitted place; dropping it gives the place back.
pub(crate) struct Pass {
    gate: Arc<Gate>,
    source: std::net::IpAddr,
}

/// What counts as one source: an IPv4 address, or an IPv6 /64 (one host usually holds a whole
/// /64, so counting single IPv6 addresses would ration nothing).
fn source_of(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            std::net::IpAddr::from(o)
        }
        v4 => v4,
    }
}

impl Gate {
    /// At most `total` places in all and `per_source` from one source ([`source_of`]).
    pub(crate) fn new(total: usize, per_source: usize) -> Self {
        Self {
            total,
            per_source,
            state: Default::default(),
        }
    }

    /// A listener's handshakes: [`MAX_HANDSHAKES`], [`MAX_HANDSHAKES_PER_SOURCE`].
    pub(super) fn handshakes() -> Self {
        Self::new(MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE)
    }

    /// A place for `ip`, if both caps allow one.
    pub(crate) fn enter(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<Pass> {
        let source = source_of(ip);
        // A poisoned lock means a panic mid-update of two counters; refusing is the safe side.
        let mut st = self.state.lock().ok()?;
        let from_source = st.per_source.get(&source).copied().unwrap_or(0);
        if st.total >= self.total || from_source >= self.per_source {
            return None;
        }
        st.total += 1;
        st.per_source.insert(source, from_source + 1);
        Some(Pass {
            gate: self.clone(),
            source,
        })
    }
}

impl Pass {
    /// The source it counts against.
    pub(crate) fn source(&self) -> std::net::IpAddr {
        self.source
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        if let Ok(mut st) = self.gate.state.lock() {
            st.total -= 1;
            if let Some(n) = st.per_source.get_mut(&self.source) {
                *n -= 1;
                if *n == 0 {
                    st.per_source.remove(&self.source);
                }
            }
        }
    }
}

pub(super) fn handshake_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(2)
        .max_frame_length(HANDSHAKE_MESSAGE_MAX)
        .new_codec()
}

/// Runs one step of the Noise state machine off the async worker, at most [`KEY_EXCHANGES`] at
/// once in the process: the curve arithmetic of a flood of handshakes must not delay the worker
/// that encrypts every live connection.
async fn key_exchange<T: Send + 'static>(
    step: impl FnOnce() -> T + Send + 'static,
) -> Result<T, HandshakeError> {
    // Never closed, so acquiring only fails if that changes; treat it like a failed task.
    let _permit = KEY_EXCHANGE_PERMITS
        .acquire()
        .await
        .map_err(|_| HandshakeError::KeyExchange)?;
    tokio::task::spawn_blocking(step)
        .await
        .map_err(|_| HandshakeError::KeyExchange)
}

pub(super) async fn handshake(
    wire: &mut Wire,
    identity: &Identity,
    initiator: bool,
) -> Result<(snow::StatelessTransportState, Vec<u8>, [u8; 32]), HandshakeError> {
    let private = identity.private;
    let mut hs = key_exchange(move || {
        let params = NOISE_PARAMS
            .parse()
            .expect("constant Noise parameters parse");
        let builder = snow::Builder::new(params)
            .prologue(PROLOGUE)?
            .local_private_key(&private)?;
        if initiator {
            builder.build_initiator()
        } else {
            builder.build_responder()
        }
    })
    .await??;
    // XX: -> e; <- e, ee, s, es; -> s, se
    let mut my_turn = initiator;
    let mut first = true;
    while !hs.is_handshake_finished() {
        if my_turn {
            let (back, sent) = key_exchange(move || {
                let mut buf = [0u8; HANDSHAKE_MESSAGE_MAX];
                let n = hs.write_message(&[], &mut buf);
                (hs, n.map(|n| Bytes::copy_from_slice(&buf[..n])))
            })
            .await?;
            hs = back;
            wire.send(sent?).await?;
        } else {
            // A responder that waits for a first message holds a descriptor for a stranger:
            // only briefly.
            let limit = if first && !initiator {
                FIRST_MESSAGE_TIMEOUT
            } else {
                HANDSHAKE_TIMEOUT
            };
            let msg = tokio::time::timeout(limit, wire.next())
                .await
                .map_err(|_| HandshakeError::TimedOut)?
                .ok_or(HandshakeError::Closed)??;
            let (back, read) = key_exchange(move || {
                let mut payload = [0u8; HANDSHAKE_MESSAGE_MAX];
                let r = hs.read_message(&msg, &mut payload).map(|_| ());
                (hs, r)
            })
            .await?;
            hs = back;
            read?;
        }
        first = false;
        my_turn = !my_turn;
    }
    let hash = hs.get_handshake_hash().to_vec();
    let mut remote = [0u8; 32];
    remote.copy_from_slice(hs.get_remote_static().ok_or(HandshakeError::NoStaticKey)?);
    let transport = hs.into_stateless_transport_mode()?;
    Ok((transport, hash, remote))
}
