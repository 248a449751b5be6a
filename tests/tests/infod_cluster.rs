//! infod on a real 4-node cluster: network namespaces, veth links, cgroups, real UDP between daemons.
//! Needs root; without it (or without iproute2, or the cpuset and memory cgroup controllers) these tests fail
//! and say what is missing.

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rmosix_common::key::ClusterKey;
use rmosix_common::load::LoadVector;
use rmosix_common::query::ClusterView;
use rmosix_common::wire::{self, Entry, Gossip};
use rmosix_testcluster::{Cluster, INFOD_PORT, PATIENCE, Spec, bin_dir_of_current_test, wait_until};

fn cluster(name: &str, nodes: u32) -> Cluster {
    Cluster::up(Spec::new(name, nodes, bin_dir_of_current_test()))
        .unwrap_or_else(|e| panic!("cannot start test cluster {name}: {e:#}"))
}

fn load_of(view: &ClusterView, node: u32) -> Option<f64> {
    view.nodes.iter().find(|n| n.id == node).and_then(|n| n.load)
}

/// How fast news spreads, in rounds, is the engine's to show (`a_small_cluster_converges_within_five_intervals`,
/// and `cargo xtask bench gossip`): here, on a machine other tests load too, the real daemons must get there,
/// and the time it took is printed.
#[test]
fn every_node_learns_every_other_nodes_load() {
    let c = cluster("learn", 4);
    let took = c
        .wait_for(PATIENCE, "every node knows every node", |_, view| {
            view.nodes.len() == 4 && view.nodes.iter().all(|n| n.alive && n.load.is_some() && n.cpus.is_some())
        })
        .unwrap();
    eprintln!("all 4 nodes knew all loads after {took:?}");
    // What they learned is each node's own cgroup: one CPU each (2 cores shared out), the 4 GiB limit.
    let view = c.view(3).unwrap();
    for n in &view.nodes {
        assert_eq!(n.address, c.addr(n.id).to_string());
        assert!(n.cpus.unwrap() >= 1);
        assert_eq!(n.mem_total.unwrap(), 4 << 30, "node {} reports its cgroup's memory limit", n.id);
        assert!(n.mem_free.unwrap() <= n.mem_total.unwrap());
    }
}

#[test]
fn a_cpu_hog_on_node_2_raises_its_load_as_seen_from_node_4() {
    let c = cluster("hog", 4);
    // Starting daemons is work too: begin once node 4 sees every node idle.
    c.wait_for(PATIENCE, "node 4 sees every node idle", |i, v| {
        i != 4 || c.node_ids().all(|n| load_of(v, n).is_some_and(|l| l < 0.5))
    })
    .unwrap();

    let mut hog = c
        .command(2, "sh")
        .unwrap()
        .args(["-c", "while :; do :; done"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let took = c
        .wait_for(PATIENCE, "node 4 sees node 2 busy", |i, v| {
            i != 4 || load_of(v, 2).is_some_and(|l| l > 0.8)
        })
        .unwrap();
    eprintln!("node 4 saw node 2's load rise after {took:?}");
    // Only node 2 is busy: the others still look idle from node 4.
    let view = c.view(4).unwrap();
    for other in [1, 3, 4] {
        assert!(load_of(&view, other).unwrap() < 0.5, "node {other}: {view:#?}");
    }
    // `mosctl best` on node 4 now avoids node 2.
    for _ in 0..3 {
        let out = c.command(4, "mosctl").unwrap().arg("best").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let best: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert_ne!(best, 2);
    }
    hog.kill().unwrap();
    hog.wait().unwrap();
    // And the load comes down again, slowly but surely.
    c.wait_for(PATIENCE, "node 2 idle again", |i, v| {
        i != 4 || load_of(v, 2).is_some_and(|l| l < 0.3)
    })
    .unwrap();
}

#[test]
fn a_dead_infod_is_marked_down_everywhere_and_comes_back() {
    let c = cluster("down", 4);
    c.wait_for(PATIENCE, "all up", |_, v| v.nodes.iter().all(|n| n.alive)).unwrap();
    c.kill_infod(3).unwrap();
    let start = Instant::now();
    // A node is marked down for having been silent down_after_ms (10 s), measured on the age of its
    // newest news, never forgotten earlier: every view that shows node 3 down still knows it, and old.
    c.wait_for_nodes(&[1, 2, 4], PATIENCE, "node 3 down everywhere", |i, v| {
        let three = v.nodes.iter().find(|n| n.id == 3).unwrap();
        assert!(three.alive || three.age_ms.is_some_and(|age| age >= 10_000), "node {i} marked node 3 down early: {three:?}");
        !three.alive
    })
    .unwrap();
    eprintln!("node 3 down everywhere after {:?}", start.elapsed());

    c.start_infod(3).unwrap();
    let took = c.wait_for(PATIENCE, "node 3 back", |_, v| v.nodes.iter().all(|n| n.alive)).unwrap();
    eprintln!("node 3 back everywhere after {took:?}");
}

/// Captures one datagram node 1's infod sends, from the host end of node 1's veth.
fn capture_from_node_1(c: &Cluster) -> (Ipv4Addr, Vec<u8>) {
    let host_if = format!("rx-{}-1", c.name());
    let index = nix::net::if_::if_nametoindex(host_if.as_str()).unwrap();
    // ETH_P_ALL: a bridge port hands its frames to the bridge before protocol-specific taps see them.
    let all = u16::to_be(u16::try_from(libc::ETH_P_ALL).unwrap());
    // SAFETY: plain socket calls on a descriptor we own.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(all)) };
    assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
    addr.sll_protocol = all;
    addr.sll_ifindex = i32::try_from(index).unwrap();
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
        )
    };
    assert_eq!(rc, 0, "bind packet socket: {}", std::io::Error::last_os_error());
    let deadline = Instant::now() + Duration::from_mins(1);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n <= 0 {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let packet = &buf[..usize::try_from(n).unwrap()];
        if packet.len() < 28 || packet[0] >> 4 != 4 {
            continue;
        }
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        if packet[9] != 17 || packet.len() < ihl + 8 {
            continue;
        }
        let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
        let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        let udp = &packet[ihl..];
        let dst_port = u16::from_be_bytes([udp[2], udp[3]]);
        if src == c.addr(1) && dst_port == INFOD_PORT {
            return (dst, udp[8..].to_vec());
        }
    }
    panic!("no datagram from node 1 seen on {host_if} within a minute");
}

/// Runs `f` on a thread that has entered the network namespace `netns`.
fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = std::fs::File::open(Path::new("/run/netns").join(netns)).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn vector(node: u32, load: f64) -> LoadVector {
    LoadVector {
        node,
        cpus: 64,
        speed: 10.0,
        load,
        mem_free: 1 << 40,
        mem_total: 1 << 40,
        guests: 0,
        flags: 0,
        incarnation: u64::MAX,
        seq: u64::MAX,
    }
}

fn now_ms() -> u64 {
    u64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis())
        .unwrap()
}

#[test]
fn forged_replayed_and_stranger_datagrams_change_nothing() {
    let mut c = cluster("forge", 4);
    c.wait_for(PATIENCE, "all up", |_, v| v.nodes.iter().all(|n| n.alive)).unwrap();
    let key = ClusterKey::load(&c.key_path()).unwrap();
    let wrong_key = ClusterKey::from_bytes(b"not the cluster key, but as long");
    // A tempting lie: node 1 claims to be an idle 64-CPU giant, and relays news of a node 99.
    let lie = |sender: u32| Gossip {
        sender,
        incarnation: u64::MAX,
        counter: u64::MAX,
        sent_at_ms: now_ms(),
        own: vector(sender, 0.0),
        entries: vec![Entry { age_ms: 0, vector: vector(99, 0.0) }, Entry { age_ms: 0, vector: vector(2, 42.0) }],
    };
    let forged_wrong_key = wire::encode(&wrong_key, &lie(1)).unwrap();
    let signed_lie = wire::encode(&key, &lie(1)).unwrap();
    let signed_stranger = wire::encode(&key, &lie(99)).unwrap();
    let mut truncated = signed_lie.clone();
    truncated.truncate(truncated.len() - 5);
    let mut garbage: Vec<u8> = (0..300u32).map(|i| u8::try_from(i * 7 % 251).unwrap()).collect();
    garbage[..4].copy_from_slice(b"RMXI");

    let before: Vec<ClusterView> = c.node_ids().map(|i| c.view(i).unwrap()).collect();
    let (outsider_ns, outsider_addr) = c.outsider().unwrap();
    let targets: Vec<Ipv4Addr> = c.node_ids().map(|i| c.addr(i)).collect();
    {
        let targets = targets.clone();
        in_netns(&outsider_ns, move || {
            let socket = UdpSocket::bind((outsider_addr, 0)).unwrap();
            for addr in targets {
                for bytes in [&forged_wrong_key, &signed_lie, &signed_stranger, &truncated, &garbage] {
                    socket.send_to(bytes, (addr, INFOD_PORT)).unwrap();
                }
            }
        });
    }
    // A real datagram of node 1, captured on the wire (so already on its way to its receiver, ahead of
    // any copy) and sent again from node 1's own address.
    let (replay_to, replayed) = capture_from_node_1(&c);
    in_netns(&c.netns(1), move || {
        let socket = UdpSocket::bind((Ipv4Addr::new(10, 213, 0, 1), 0)).unwrap();
        for _ in 0..3 {
            socket.send_to(&replayed, (replay_to, INFOD_PORT)).unwrap();
        }
    });

    // Every node drops and counts what it was sent: wrong key: mac; node 1's id from the outsider's
    // address: unknown_sender (from_self at node 1); node 99: unknown_sender; truncated: length; garbage:
    // whichever check it fails first; and the replays, at their receiver.
    c.wait_for(PATIENCE, "every node to count the forged datagrams as dropped", |i, v| {
        let dropped = &v.counters.dropped;
        let count = |reason: &str| dropped.get(reason).copied().unwrap_or(0);
        count("mac") >= 1
            && count("unknown_sender") + count("from_self") >= 2
            && count("length") >= 1
            && dropped.values().sum::<u64>() >= 5
            && (c.addr(i) != replay_to || count("replay") >= 3)
    })
    .unwrap();
    for i in c.node_ids() {
        let after = c.view(i).unwrap();
        let prev = &before[usize::try_from(i - 1).unwrap()];
        assert_eq!(after.nodes.len(), prev.nodes.len());
        for n in &after.nodes {
            assert_ne!(n.cpus, Some(64), "node {i} believed a lie about node {}", n.id);
            assert_ne!(n.load, Some(42.0), "node {i} believed a lie about node {}", n.id);
            assert!(n.alive, "node {i} sees node {} down", n.id);
        }
        assert!(after.nodes.iter().all(|n| n.id != 99));
    }
    // Still a working cluster afterwards.
    c.wait_for(PATIENCE, "all fresh", |_, v| v.nodes.iter().all(|n| n.age_ms.unwrap() < 4000)).unwrap();
}

#[test]
fn mosctl_status_shows_the_cluster_and_a_bad_map_reload_keeps_the_old_map() {
    let c = cluster("status", 3);
    c.wait_for(PATIENCE, "all up", |_, v| v.nodes.iter().all(|n| n.alive)).unwrap();

    let out = c.command(2, "mosctl").unwrap().args(["status", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes = json["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for (n, i) in nodes.iter().zip(1..) {
        assert_eq!(n["id"], i);
        assert_eq!(n["address"], c.addr(i).to_string());
        assert_eq!(n["alive"], true);
        for field in ["load", "cpus", "speed", "mem_free", "mem_total", "guests", "age_ms"] {
            assert!(n[field].is_number(), "{field} in {n}");
        }
    }
    let out = c.command(2, "mosctl").unwrap().arg("status").output().unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("NODE") || table.trim_start().starts_with("NODE"), "{table}");
    assert!(table.contains("   2*  10.213.0.2"), "{table}");
    assert_eq!(table.lines().filter(|l| l.contains(" up ")).count(), 3, "{table}");

    // infod --check on the node's configuration passes...
    let check = c.command(1, "infod").unwrap().arg("--check").output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    assert!(String::from_utf8_lossy(&check.stdout).contains("this is node 1 (10.213.0.1)"));

    // ...a broken map is refused by --check with file and line, and on SIGHUP the running infod keeps the old one.
    let map = c.dir().join("mosix.map");
    let good = std::fs::read_to_string(&map).unwrap();
    std::fs::write(&map, format!("{good}4 10.213.0.3 1\n")).unwrap();
    let check = c.command(1, "infod").unwrap().arg("--check").output().unwrap();
    assert!(!check.status.success());
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(err.contains(&format!("{}:5: address 10.213.0.3 is already given to node 3", map.display())), "{err}");
    let pid: i32 = std::fs::read_to_string(c.node_dir(1).join("infod.pid")).unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP).unwrap();
    let log = c.node_dir(1).join("infod.log");
    wait_until("infod to refuse the broken map", PATIENCE, || {
        std::fs::read_to_string(&log).unwrap().contains("bad cluster map; keeping the old one")
    });
    let view = c.view(1).unwrap();
    assert_eq!(view.nodes.len(), 3);
    c.wait_for(PATIENCE, "still gossiping", |_, v| v.nodes.iter().all(|n| n.age_ms.unwrap() < 3000)).unwrap();

    // A good map with a fourth node is taken on SIGHUP; the new node is known but down.
    std::fs::write(&map, format!("{good}4 10.213.0.4 1\n")).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP).unwrap();
    let view = view_with_four_nodes(&c);
    assert!(!view.nodes[3].alive, "{view:#?}");
}

/// Node 1's view once it has taken the map with a fourth node.
fn view_with_four_nodes(c: &Cluster) -> ClusterView {
    rmosix_testcluster::wait_until_some("infod to take the map with a fourth node", PATIENCE, || {
        Some(c.view(1).unwrap()).filter(|view| view.nodes.len() == 4)
    })
}
