//! The simulated sending side of a connection: what sits between a replicator and the wire.
//!
//! With [`SendQueues::Ideal`] (the default) answers are pulled from the replicator one at a
//! time, the moment the node's uplink is free: the best any sender could do, and not what a
//! real connection does. The other two model a connection per peer as the synchronizer runs
//! one (`sync::connections`, `net::write_batches`): answers are pulled into that peer's queue
//! while the queue's budget allows, control messages are queued too, and the node's uplink
//! drains the queues of all its connections, sharing its bytes fairly between them (as TCP
//! flows through one bottleneck do). What is queued was decided when it was pulled; only what
//! is pulled later sees the swarm as it is then.

use super::{Delivery, Sim};
use crate::core::pacing::SendBudget;
use feedsync_protocol::{MAX_DATA_BYTES, Message, encode};
use std::collections::VecDeque;

/// How a simulated node queues what it sends (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SendQueues {
    /// Answers pulled one at a time when the uplink is free; control messages sent at once.
    #[default]
    Ideal,
    /// The synchronizer's connections: a budget per connection that follows its drain rate
    /// ([`crate::core::pacing`]), and control messages ahead of queued answers.
    Production,
    /// One first-in first-out queue per connection holding up to `budget` bytes of answers,
    /// with control messages behind them (the synchronizer before #12: 4 MiB).
    Fifo {
        /// Bytes of answers a connection may have queued.
        budget: u64,
    },
}

/// One directed connection's queue.
pub(super) struct LinkQueue {
    /// Control messages (everything but answers) and their encoded sizes.
    control: VecDeque<(Message, u64)>,
    /// Answers (`Data`, `NoData`) and their sizes; in FIFO mode, everything.
    data: VecDeque<(Message, u64)>,
    /// Block bytes of the answers queued (what the budget counts).
    data_bytes: u64,
    budget: SendBudget,
    /// Fair-queueing tag: bytes this link has been given, on the node's virtual clock.
    vtime: u64,
}

fn size_of(message: &Message) -> u64 {
    // Invariant: the replicator only emits messages within protocol limits.
    encode(message)
        .expect("replicator emitted an unencodable message")
        .len() as u64
}

fn payload(message: &Message) -> u64 {
    match message {
        Message::Data(d) => d.blocks.iter().map(|b| b.0.len() as u64).sum(),
        _ => 0,
    }
}

impl Sim {
    /// Whether `node`'s messages go through connection queues.
    pub(super) fn queued_mode(&self) -> bool {
        self.config.queues != SendQueues::Ideal
    }

    fn link_queue(&mut self, from: usize, to: usize) -> &mut LinkQueue {
        let now = self.now;
        self.link_queues
            .entry((from, to))
            .or_insert_with(|| LinkQueue {
                control: VecDeque::new(),
                data: VecDeque::new(),
                data_bytes: 0,
                budget: SendBudget::new(now),
                vtime: 0,
            })
    }

    /// Puts `message` in the `from -> to` queue (control lane, or the FIFO).
    pub(super) fn enqueue(&mut self, from: usize, to: usize, message: Message, answer: bool) {
        let size = size_of(&message);
        let fifo = matches!(self.config.queues, SendQueues::Fifo { .. });
        let clock = self.vclock[from];
        let now = self.now;
        let q = self.link_queue(from, to);
        if q.control.is_empty() && q.data.is_empty() {
            q.vtime = q.vtime.max(clock); // newly backlogged: no credit for the idle time
        }
        if answer {
            q.data_bytes += payload(&message);
            let queued = q.data_bytes;
            q.data.push_back((message, size));
            q.budget.on_queued(now, queued);
        } else if fifo {
            q.data.push_back((message, size));
        } else {
            q.control.push_back((message, size));
        }
    }

    /// Bytes of answers `from` may still queue for `to` now.
    fn room(&mut self, from: usize, to: usize) -> u64 {
        let fixed = match self.config.queues {
            SendQueues::Fifo { budget } => Some(budget),
            _ => None,
        };
        let q = self.link_queue(from, to);
        let allowed = fixed.unwrap_or_else(|| q.budget.allowed());
        allowed.saturating_sub(q.data_bytes)
    }

    /// Pulls answers into every connection of `node` that has room, its peers taking turns, then
    /// lets the uplink send.
    pub(super) fn pump_queued(&mut self, node: usize) {
        let order = self.peers_in_turn(node);
        let mut progress = true;
        while progress {
            progress = false;
            for &peer in &order {
                let to = peer as usize;
                let room = self.room(node, to);
                if room == 0 {
                    continue;
                }
                let max = (room as usize).min(MAX_DATA_BYTES);
                if let Some(messages) = self.nodes[node].poll_upload_limited(peer, max) {
                    self.last_served[node] = peer;
                    for m in messages {
                        self.enqueue(node, to, m, true);
                    }
                    progress = true;
                }
            }
        }
        self.kick(node);
    }

    /// If `node`'s uplink is free, puts the next queued message on the wire: the connection
    /// with the least service so far (start-time fair queueing), control lane first.
    pub(super) fn kick(&mut self, node: usize) {
        loop {
            if self.pump_pending[node] && self.config.uplink.is_some() {
                return; // the uplink is busy; `UplinkFree` calls back
            }
            let next = self
                .link_queues
                .iter()
                .filter(|((f, _), q)| *f == node && !(q.control.is_empty() && q.data.is_empty()))
                .min_by_key(|((_, to), q)| (q.vtime, *to))
                .map(|((_, to), _)| *to);
            let Some(to) = next else { return };
            let now = self.now;
            let q = self.link_queue(node, to);
            let (message, size) = match q.control.pop_front() {
                Some(m) => m,
                None => q.data.pop_front().expect("a non-empty queue was chosen"),
            };
            let bytes = payload(&message);
            q.data_bytes -= bytes;
            let queued = q.data_bytes;
            q.budget.on_written(now, bytes, queued);
            let started = q.vtime;
            q.vtime += size;
            self.vclock[node] = self.vclock[node].max(started);
            match self.config.uplink {
                Some(up) => {
                    let done = now + size * 1_000_000 / up;
                    self.uplink_free[node] = done;
                    self.wire(node, to, message, size, done);
                    self.pump_pending[node] = true;
                    self.push(done, Delivery::UplinkFree { node });
                    return;
                }
                None => self.wire(node, to, message, size, now),
            }
        }
    }
}
