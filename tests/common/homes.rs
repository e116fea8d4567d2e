//! Two homes behind NATs and an "internet" between them, in network namespaces of the
//! caller's (tests/reach.rs, benches/reach.rs). Needs root (or a user namespace).

use super::{BIN, Proc, ip, wait_until};
use std::process::Command;
use std::time::Duration;

/// `feedsync dht-node` on `ns` at `addr`, joined through `bootstrap`.
pub fn dht_node(cmd: Command, addr: &str) -> Proc {
    let p = Proc::spawn(cmd);
    p.wait_line(Duration::from_secs(30), "the DHT node up", |l| {
        l == format!("dht node on {addr}")
    });
    p
}

/// The routers' firewall: masquerade out of the uplink, nothing new in (dropped, not
/// refused, as a home router does), and the chains miniupnpd fills when it runs. One
/// table: an accept in another table would not undo this one's drop.
const ROUTER_RULES: &str = r#"
table inet filter {
    chain input {
        type filter hook input priority filter; policy drop;
        iif "lo" accept
        ct state established,related accept
        ct state invalid drop
        iifname "lan0" accept
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        ct state invalid drop
        iifname "lan0" oifname "wan0" accept
        jump miniupnpd
    }
    chain miniupnpd { }
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        jump prerouting_miniupnpd
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        jump postrouting_miniupnpd
        oifname "wan0" masquerade
    }
    chain prerouting_miniupnpd { }
    chain postrouting_miniupnpd { }
}
"#;

/// miniupnpd 2.3.1 takes no private external address (10.1.0.2) unless STUN confirms it:
/// a minimal STUN binding responder, run in the "internet".
const STUN_PY: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("stun ready", flush=True)
while True:
    data, (rip, rport) = s.recvfrom(2048)
    if len(data) < 20 or data[0:2] != b"\x00\x01":
        continue
    cookie, txid = data[4:8], data[8:20]
    a = socket.inet_aton(rip)
    xaddr = bytes(x ^ y for x, y in zip(a, b"\x21\x12\xa4\x42"))
    attrs = struct.pack("!HHBBH", 0x0001, 8, 0, 1, rport) + a
    attrs += struct.pack("!HHBBH", 0x0020, 8, 0, 1, rport ^ 0x2112) + xaddr
    s.sendto(struct.pack("!HH", 0x0101, len(attrs)) + cookie + txid + attrs, (rip, rport))
"#;

/// Two homes behind NATs and the internet between them, all in namespaces of the test's:
///
/// ```text
///   pub: routes 10.1.0.0/24 <-> 10.2.0.0/24; services on lo: DHT 10.0.0.11-13, relay
///        10.0.0.20, STUN 10.0.0.30
///   r1: wan0 10.1.0.2, lan0 192.168.1.1 (NAT)    r2: wan0 10.2.0.2, lan0 192.168.2.1 (NAT)
///   h1: up0 192.168.1.2 via r1                   h2: up0 192.168.2.2 via r2
/// ```
/// Veth pairs are made inside the namespaces: this machine's own interfaces, routes and
/// firewall are never touched. Removed on drop (with every process in them).
pub struct Homes {
    prefix: String,
    made: Vec<String>,
    /// miniupnpd and the STUN responder, killed on drop.
    services: Vec<Proc>,
    dir: tempfile::TempDir,
}

/// The test's address plan, for the socket audit.
pub const PLAN: &[(&str, u8)] = &[
    ("10.0.0.0", 24),
    ("10.1.0.0", 24),
    ("10.2.0.0", 24),
    ("192.168.1.0", 24),
    ("192.168.2.0", 24),
    ("127.0.0.0", 8),
    // The UPnP search goes to the LAN's SSDP group.
    ("239.255.255.250", 32),
];

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Homes {
    pub fn new() -> Homes {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("fsr{}n{k}", std::process::id());
        let mut h = Homes {
            prefix,
            made: Vec::new(),
            services: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        for n in ["pub", "r1", "r2", "h1", "h2"] {
            let ns = h.ns(n);
            ip(&["netns", "add", &ns]);
            h.made.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        let (public, r1, r2, h1, h2) =
            (h.ns("pub"), h.ns("r1"), h.ns("r2"), h.ns("h1"), h.ns("h2"));
        for (a, ai, b, bi) in [
            (&r1, "wan0", &public, "r1"),
            (&r2, "wan0", &public, "r2"),
            (&h1, "up0", &r1, "lan0"),
            (&h2, "up0", &r2, "lan0"),
        ] {
            ip(&[
                "-n", a, "link", "add", ai, "type", "veth", "peer", "name", bi, "netns", b,
            ]);
        }
        ip(&["-n", &public, "addr", "add", "10.1.0.1/24", "dev", "r1"]);
        ip(&["-n", &public, "addr", "add", "10.2.0.1/24", "dev", "r2"]);
        ip(&["-n", &public, "link", "set", "r1", "up"]);
        ip(&["-n", &public, "link", "set", "r2", "up"]);
        for a in [
            "10.0.0.11",
            "10.0.0.12",
            "10.0.0.13",
            "10.0.0.20",
            "10.0.0.30",
        ] {
            ip(&[
                "-n",
                &public,
                "addr",
                "add",
                &format!("{a}/32"),
                "dev",
                "lo",
            ]);
        }
        h.sysctl(&public);
        let rules = h.dir.path().join("router.nft");
        std::fs::write(&rules, ROUTER_RULES).unwrap();
        for (i, (r, host)) in [(&r1, &h1), (&r2, &h2)].into_iter().enumerate() {
            let i = i + 1;
            ip(&[
                "-n",
                r,
                "addr",
                "add",
                &format!("10.{i}.0.2/24"),
                "dev",
                "wan0",
            ]);
            ip(&[
                "-n",
                r,
                "addr",
                "add",
                &format!("192.168.{i}.1/24"),
                "dev",
                "lan0",
            ]);
            ip(&["-n", r, "link", "set", "wan0", "up"]);
            ip(&["-n", r, "link", "set", "lan0", "up"]);
            ip(&[
                "-n",
                r,
                "route",
                "add",
                "default",
                "via",
                &format!("10.{i}.0.1"),
            ]);
            h.sysctl(r);
            run(Command::new("ip")
                .args(["netns", "exec", r, "nft", "-f"])
                .arg(&rules));
            ip(&[
                "-n",
                host,
                "addr",
                "add",
                &format!("192.168.{i}.2/24"),
                "dev",
                "up0",
            ]);
            ip(&["-n", host, "link", "set", "up0", "up"]);
            ip(&[
                "-n",
                host,
                "route",
                "add",
                "default",
                "via",
                &format!("192.168.{i}.1"),
            ]);
        }
        h
    }

    fn sysctl(&self, ns: &str) {
        run(Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ]));
    }

    /// The full name of namespace `short` (pub, r1, r2, h1, h2).
    pub fn ns(&self, short: &str) -> String {
        format!("{}{short}", self.prefix)
    }

    /// `program ARGS` in namespace `short` (not started).
    pub fn command(&self, short: &str, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(short), program])
            .args(args);
        c
    }

    /// Starts a UPnP-IGD / NAT-PMP / PCP gateway (miniupnpd) on router 1, with the STUN
    /// responder it needs, and waits until it serves.
    pub fn upnp_on_r1(&mut self) {
        self.gateway_on_r1(true)
    }

    /// A gateway on router 1 that speaks PCP and NAT-PMP but not UPnP.
    pub fn pcp_only_on_r1(&mut self) {
        self.gateway_on_r1(false)
    }

    fn gateway_on_r1(&mut self, upnp: bool) {
        let stun = Proc::spawn(self.command(
            "pub",
            "python3",
            &["-u", "-c", STUN_PY, "10.0.0.30", "3478"],
        ));
        stun.wait_line(Duration::from_secs(30), "the STUN responder", |l| {
            l == "stun ready"
        });
        self.services.push(stun);
        let conf = self.dir.path().join("miniupnpd.conf");
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
        std::fs::write(
            &conf,
            format!(
                "ext_ifname=wan0\nlistening_ip=lan0\nipv6_disable=yes\nhttp_port=0\n\
                     enable_upnp={}\nenable_natpmp=yes\next_perform_stun=yes\n\
                     ext_stun_host=10.0.0.30\next_stun_port=3478\nsecure_mode=yes\n\
                     system_uptime=no\nnotify_interval=60\nuuid={}\n\
                     minissdpdsocket={}\nupnp_table_name=filter\nupnp_nat_table_name=filter\n\
                     upnp_forward_chain=miniupnpd\nupnp_nat_chain=prerouting_miniupnpd\n\
                     upnp_nat_postrouting_chain=postrouting_miniupnpd\n\
                     allow 1024-65535 192.168.1.0/24 1024-65535\n\
                     deny 0-65535 0.0.0.0/0 0-65535\n",
                if upnp { "yes" } else { "no" },
                uuid.trim(),
                self.dir.path().join("minissdpd.sock-unused").display()
            ),
        )
        .unwrap();
        let pidfile = self.dir.path().join("miniupnpd.pid");
        let gw = Proc::spawn(self.command(
            "r1",
            "miniupnpd",
            &[
                "-d",
                "-f",
                conf.to_str().unwrap(),
                "-P",
                pidfile.to_str().unwrap(),
            ],
        ));
        wait_until(Duration::from_secs(30), "miniupnpd to serve", || {
            let all = [gw.lines(), gw.errors()].concat();
            (!upnp || all.iter().any(|l| l.contains("HTTP listening")))
                && all.iter().any(|l| l.contains("Listening for NAT-PMP"))
        });
        self.services.push(gw);
    }

    /// The DNAT rules miniupnpd holds on router 1 (the mappings it made).
    pub fn r1_forwards(&self) -> String {
        let out = self
            .command(
                "r1",
                "nft",
                &["list", "chain", "inet", "filter", "prerouting_miniupnpd"],
            )
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Homes {
    fn drop(&mut self) {
        self.services.clear();
        for ns in &self.made {
            // Whatever a failed test left running in them goes first.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The guard every DHT process in a test or bench runs under (`reach::dht::PRIVATE_ONLY_ENV`):
/// starting with the public bootstrap nodes is an error.
pub const PRIVATE_ONLY: &str = "FEEDSYNC_DHT_PRIVATE_ONLY";
/// The relay [`internet_services`] runs.
pub const RELAY: &str = "10.0.0.20:7071";

impl Homes {
    /// `feedsync ARGS` in home `host` ("h1", "h2") that reaches out only through the DHT node
    /// `bootstrap` (and [`RELAY`], with `relay`): no mDNS, no `--peer`, under [`PRIVATE_ONLY`].
    /// Not started.
    pub fn reaching(&self, host: &str, args: &[&str], bootstrap: &str, relay: bool) -> Command {
        let mut all = args.to_vec();
        all.extend(["--no-discovery", "--dht", "--dht-bootstrap", bootstrap]);
        if relay {
            all.extend(["--relay", RELAY]);
        }
        let mut c = self.command(host, BIN, &all);
        c.env(PRIVATE_ONLY, "1");
        c
    }
}

/// The private DHT (three nodes) and the relay, in the "internet".
pub fn internet_services(homes: &Homes) -> Vec<Proc> {
    let mut procs = Vec::new();
    for (i, a) in ["10.0.0.11:6881", "10.0.0.12:6881", "10.0.0.13:6881"]
        .iter()
        .enumerate()
    {
        let mut args = vec!["dht-node", "--listen", a];
        if i > 0 {
            args.extend(["--dht-bootstrap", "10.0.0.11:6881"]);
        }
        procs.push(dht_node(homes.command("pub", BIN, &args), a));
    }
    let relay = Proc::spawn(homes.command("pub", BIN, &["relay", "--listen", RELAY]));
    relay.wait_line(Duration::from_secs(30), "the relay up", |l| {
        l == format!("relay listening on {RELAY}")
    });
    procs.push(relay);
    procs
}
