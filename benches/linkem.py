#!/usr/bin/env python3
"""A user-space WAN link for benches/wan.rs, and a plain TCP bulk transfer to check it.

Why user space: this kernel has no sch_netem (only tbf, htb, pfifo), so delay and random loss
cannot be set with `tc`. Instead two TUN devices (no packet-info header, no virtio-net header,
hence no GSO: the kernel hands over packets of at most the MTU) are opened here, inside a
namespace of the bench's own; the bench then moves each device into one host's namespace (an
open TUN fd stays attached to its device across the move) and this process relays IP packets
between the two fds.

Each direction is one link, like `netem delay D loss L rate R` plus a drop-tail queue:
- loss: a packet is dropped with probability L when it arrives (seeded, per direction);
- rate: packets leave one after the other, each taking len * 8 / R seconds (IP bytes; no
  framing overhead is added);
- queue: a packet that would wait more than Q seconds for the line (Q * R / 8 bytes ahead of
  it) is dropped (drop-tail);
- delay: a packet is delivered D seconds after its last bit left the line.

Subcommands:
  link TUN_A TUN_B [--delay-ms 25] [--loss 0.01] [--rate-bps 20e6] [--queue-ms 100] [--seed N]
      Creates both devices, prints "ready", relays until SIGTERM/SIGINT, then prints one line
      of counters ("stats a2b=... b2a=...") on stdout.
  recv ADDR PORT
      Accepts one TCP connection, reads to EOF, prints "received BYTES", closes.
  send ADDR PORT BYTES CC
      Sends BYTES with congestion control CC, waits until the receiver closes (every byte
      read), prints goodput, the sender's smoothed RTT (mean of 10 Hz samples), cwnd and
      retransmitted segments (from TCP_INFO).
"""

import collections
import fcntl
import os
import random
import select
import signal
import socket
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Direction:
    """One way of the link: arrivals from `src`, deliveries to `dst`."""

    def __init__(self, src, dst, delay, loss, rate, queue, seed):
        self.src, self.dst = src, dst
        self.delay, self.loss, self.rate, self.queue = delay, loss, rate, queue
        self.rng = random.Random(seed)
        # (deliver_at, packet); deliver_at never decreases, so a FIFO is a timer queue.
        self.pending = collections.deque()
        self.line_free_at = 0.0
        self.packets = self.bytes = self.lost = self.tail_dropped = self.write_failed = 0

    def arrive(self, packet, now):
        self.packets += 1
        if self.rng.random() < self.loss:
            self.lost += 1
            return
        start = max(now, self.line_free_at)
        if start - now > self.queue:
            self.tail_dropped += 1
            return
        self.line_free_at = start + len(packet) * 8 / self.rate
        self.pending.append((self.line_free_at + self.delay, packet))

    def read_all(self, now):
        # Bounded so that one busy direction cannot starve the other's deliveries.
        for _ in range(256):
            try:
                packet = os.read(self.src, 65536)
            except BlockingIOError:
                return
            self.arrive(packet, now)

    def deliver(self, now):
        while self.pending and self.pending[0][0] <= now:
            _, packet = self.pending.popleft()
            try:
                os.write(self.dst, packet)
                self.bytes += len(packet)
            except OSError:
                # The device is down (being moved, or torn down): the packet is lost, as on a
                # wire that is unplugged.
                self.write_failed += 1

    def next_due(self):
        return self.pending[0][0] if self.pending else None

    def stats(self):
        return (
            f"packets={self.packets},delivered_bytes={self.bytes},lost={self.lost},"
            f"tail_dropped={self.tail_dropped},write_failed={self.write_failed}"
        )


def link(args):
    names = args[:2]
    opts = dict(zip(args[2::2], args[3::2]))
    delay = float(opts.get("--delay-ms", 25)) / 1e3
    loss = float(opts.get("--loss", 0.01))
    rate = float(opts.get("--rate-bps", 20e6))
    queue = float(opts.get("--queue-ms", 100)) / 1e3
    seed = int(opts.get("--seed", 1))
    fa, fb = open_tun(names[0]), open_tun(names[1])
    a2b = Direction(fa, fb, delay, loss, rate, queue, seed)
    b2a = Direction(fb, fa, delay, loss, rate, queue, seed + 1)
    by_fd = {fa: a2b, fb: b2a}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    print("ready", flush=True)
    while not stop:
        now = time.monotonic()
        dues = [d for d in (a2b.next_due(), b2a.next_due()) if d is not None]
        timeout = max(0.0, min(dues) - now) if dues else 0.5
        try:
            ready, _, _ = select.select([fa, fb], [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd in ready:
            by_fd[fd].read_all(now)
        a2b.deliver(now)
        b2a.deliver(now)
    print(f"stats a2b={a2b.stats()} b2a={b2a.stats()}", flush=True)


def recv(args):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args[0], int(args[1])))
    srv.listen(1)
    print("listening", flush=True)
    conn, _ = srv.accept()
    total = 0
    while True:
        chunk = conn.recv(1 << 20)
        if not chunk:
            break
        total += len(chunk)
    conn.close()
    print(f"received {total}", flush=True)


def tcp_info(sock):
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    # struct tcp_info: 8 bytes of u8 fields, then u32s: rto, ato, snd_mss, rcv_mss, unacked,
    # sacked, lost, retrans, fackets, 4 x last_*, pmtu, rcv_ssthresh, rtt (us), rttvar,
    # snd_ssthresh, snd_cwnd, advmss, reordering, rcv_rtt, rcv_space, total_retrans.
    u32 = struct.unpack_from("24I", raw, 8)
    return {"rtt_us": u32[15], "cwnd": u32[18], "total_retrans": u32[23]}


def send(args):
    addr, port, nbytes, cc = args[0], int(args[1]), int(args[2]), args[3]
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
    block = os.urandom(1 << 16)
    t0 = time.monotonic()
    sock.connect((addr, port))
    sent = 0
    rtts, cwnds = [], []
    next_sample = t0
    while sent < nbytes:
        sent += sock.send(block[: min(len(block), nbytes - sent)])
        now = time.monotonic()
        if now >= next_sample:
            info = tcp_info(sock)
            rtts.append(info["rtt_us"])
            cwnds.append(info["cwnd"])
            next_sample = now + 0.1
    sock.shutdown(socket.SHUT_WR)
    # The receiver closes after reading every byte: this is the end of the transfer.
    while sock.recv(4096):
        pass
    took = time.monotonic() - t0
    info = tcp_info(sock)
    sock.close()
    mean_rtt = sum(rtts) / len(rtts) / 1e3 if rtts else 0.0
    mean_cwnd = sum(cwnds) / len(cwnds) if cwnds else 0.0
    print(
        f"cc={cc} bytes={nbytes} seconds={took:.3f} goodput_mbit={nbytes * 8 / took / 1e6:.2f} "
        f"mean_srtt_ms={mean_rtt:.1f} mean_cwnd={mean_cwnd:.0f} "
        f"retrans_segments={info['total_retrans']}",
        flush=True,
    )


if __name__ == "__main__":
    {"link": link, "recv": recv, "send": send}[sys.argv[1]](sys.argv[2:])
