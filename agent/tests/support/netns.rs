//! Network namespaces for the fault tests: every agent in its own namespace, so one can be cut
//! off its peers while the others (and the test) keep talking.
//!
//! Each namespace has two links to the test's namespace:
//! - a *peer leg* on a bridge shared by all agents (`10.213.<x>.<i+1>/24`), carrying Raft and
//!   cluster traffic; isolating an agent takes its bridge port down;
//! - a *client leg*, a point-to-point veth (`10.214.<x>.<4i+2>/30`) the test's clients use, so
//!   the test can still talk to an isolated agent and see what it does without its peers.
//!
//! Names and subnets carry the test process's id so concurrent runs do not collide; everything
//! is deleted on drop (deleting a namespace deletes the veths inside it and their pairs).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;

use super::cluster::Addresses;

/// Client port inside every namespace.
const CLIENT_PORT: u16 = 7070;
/// Peer port inside every namespace.
const PEER_PORT: u16 = 7071;
/// Metrics port inside every namespace.
const METRICS_PORT: u16 = 9090;

/// The namespaces, bridge and veths of one cluster.
pub struct Namespaces {
    /// Distinguishes this run's names (`s<tag>...`) and subnets (`10.21x.<subnet>.0`).
    tag: u32,
    subnet: u8,
    count: usize,
}

impl Namespaces {
    /// Creates `count` namespaces wired as described in the module docs; `Err` names the
    /// command that failed (e.g. without CAP_NET_ADMIN).
    pub fn create(count: usize) -> Result<Namespaces, String> {
        let pid = std::process::id();
        let mut ns = Namespaces {
            tag: pid % 100_000,
            // 20..=219: clear of 10.x.0/1 ranges a machine is likely to use already.
            subnet: u8::try_from(pid % 200 + 20).unwrap_or(20),
            count: 0,
        };
        let bridge = ns.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ns.count = count; // From here on, drop cleans up whatever exists.
        ip(&[
            "addr",
            "add",
            &format!("10.213.{}.254/24", ns.subnet),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..count {
            let name = ns.name(i);
            ip(&["netns", "add", &name])?;
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            // Peer leg on the bridge.
            let (host, inner) = (ns.link(i, 'b'), ns.link(i, 'p'));
            ip(&[
                "link", "add", &host, "type", "veth", "peer", "name", &inner, "netns", &name,
            ])?;
            ip(&["link", "set", &host, "master", &bridge])?;
            ip(&["link", "set", &host, "up"])?;
            let peer_ip = format!("{}/24", ns.peer_ip(i));
            ip(&["-n", &name, "addr", "add", &peer_ip, "dev", &inner])?;
            ip(&["-n", &name, "link", "set", &inner, "up"])?;
            // Client leg, point to point with the test's namespace.
            let (host, inner) = (ns.link(i, 'c'), ns.link(i, 'd'));
            ip(&[
                "link", "add", &host, "type", "veth", "peer", "name", &inner, "netns", &name,
            ])?;
            let host_ip = format!("10.214.{}.{}/30", ns.subnet, 4 * i + 1);
            ip(&["addr", "add", &host_ip, "dev", &host])?;
            ip(&["link", "set", &host, "up"])?;
            let inner_ip = format!("{}/30", ns.client_ip(i));
            ip(&["-n", &name, "addr", "add", &inner_ip, "dev", &inner])?;
            ip(&["-n", &name, "link", "set", &inner, "up"])?;
        }
        Ok(ns)
    }

    /// Namespace of agent `i`.
    pub fn name(&self, i: usize) -> String {
        format!("sluice-{}-{i}", self.tag)
    }

    /// Addresses of agent `i`: peer port on the bridge, client port on its client leg.
    pub fn addresses(&self, i: usize) -> Addresses {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        Addresses {
            client: SocketAddr::new(self.client_ip(i), CLIENT_PORT),
            listen: SocketAddr::new(any, CLIENT_PORT),
            metrics: SocketAddr::new(any, METRICS_PORT),
            peer: SocketAddr::new(self.peer_ip(i), PEER_PORT),
            peer_listen: SocketAddr::new(self.peer_ip(i), PEER_PORT),
        }
    }

    /// Takes agent `i`'s bridge port down (`up = false`) or up again.
    pub fn set_peer_link(&self, i: usize, up: bool) -> Result<(), String> {
        let state = if up { "up" } else { "down" };
        ip(&["link", "set", &self.link(i, 'b'), state])
    }

    fn bridge(&self) -> String {
        format!("s{}br", self.tag)
    }

    /// Interface names stay within the kernel's 15 characters: `s` + at most 5 digits + 2.
    fn link(&self, i: usize, kind: char) -> String {
        format!("s{}{kind}{i}", self.tag)
    }

    fn peer_ip(&self, i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 213, self.subnet, (i + 1) as u8))
    }

    fn client_ip(&self, i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 214, self.subnet, (4 * i + 2) as u8))
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for i in 0..self.count {
            let _ = ip(&["netns", "del", &self.name(i)]);
            // Pairs of deleted veths go with them; the client legs' host sides too.
            let _ = ip(&["link", "del", &self.link(i, 'c')]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

/// Runs `ip <args>`; `Err` carries the command and its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
