//! What a node takes from its peers is bounded: an image set larger than the destination's limit
//! (`[migd] max_image_bytes`, by default its free memory less a margin) is refused from the offer, before a
//! byte of it is sent, and the job runs on where it was. Run as the ordinary test user, with python3.

use std::process::Stdio;

use rmosix_testcluster::user::{Lines, test_user};
use rmosix_testcluster::{Cluster, PATIENCE, Spec, bin_dir_of_current_test, wait_until};

/// Holds 64 MiB (touched, so it is dumped) and prints 100 numbered lines; the last 50 wait for stdin's end.
const HOLDER: &str = r"
import sys, time
block = bytearray(64 << 20)
for i in range(0, len(block), 4096):
    block[i] = 1
for line in range(100):
    if line == 50:
        sys.stdin.read()
    print(line, flush=True)
    time.sleep(0.01)
";

#[test]
fn an_image_set_larger_than_the_destination_takes_is_refused_before_it_is_sent() {
    let c = Cluster::up(Spec::new("imglim", 2, bin_dir_of_current_test())).unwrap();
    let u = test_user().unwrap();
    // Node 2 takes at most 16 MiB of images.
    let config = c.config(2);
    let text = std::fs::read_to_string(&config).unwrap().replace("[migd]\n", "[migd]\nmax_image_bytes = 16777216\n");
    std::fs::write(&config, text).unwrap();
    c.kill_daemon(2, "migd").unwrap();
    c.start_migd(2).unwrap();

    let mut child = c
        .command_as(1, &u, "mosrun")
        .unwrap()
        .args(["/usr/bin/python3", "-c", HOLDER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let lines = Lines::of(&mut child);
    lines.wait_for(5);
    let out = c.command_as(1, &u, "migrate").unwrap().args([pid.to_string().as_str(), "2"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the move must be refused: {out:?}");
    assert!(err.contains("node 2 has room for 16 MiB of images now and the job's are"), "{err}");
    // Refused from the offer: node 2 says so, and node 1 never got to the transfer.
    let log = std::fs::read_to_string(c.node_dir(2).join("migd.log")).unwrap();
    assert!(log.contains("offer refused"), "{log}");
    let log = std::fs::read_to_string(c.node_dir(1).join("migd.log")).unwrap();
    assert!(log.contains("dumped") && !log.contains("accepted"), "{log}");
    // The job runs on where it was, whole.
    let [_] = c.processes(1, "python3")[..] else { panic!("the job runs on at node 1") };
    assert!(c.processes(2, "python3").is_empty());
    let n = lines.count();
    wait_until("more output after the refusal", PATIENCE, || lines.count() > n);
    drop(child.stdin.take());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let expected: String = (0..100).fold(String::new(), |s, i| s + &i.to_string() + "\n");
    assert_eq!(lines.finish(), expected);
}

/// Opens a job link to node 1's migd from node `from`'s namespace, with the real cluster key, claiming to
/// run job `home_pid` at generation `epoch`; returns home's answer (frame kind and payload).
fn attach_as(c: &Cluster, from: u32, home_pid: i32, epoch: u32) -> (u8, Vec<u8>) {
    use rmosix_migd::channel::blocking::Channel;
    use rmosix_migd::protocol::{ATTACH, Attach};
    let key = rmosix_common::key::ClusterKey::load(&c.key_path()).unwrap();
    let ns = std::fs::File::open(std::path::Path::new("/run/netns").join(c.netns(from))).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let stream = std::net::TcpStream::connect(("10.213.0.1", rmosix_testcluster::MIGD_PORT)).unwrap();
        let mut link = Channel::client_tcp(stream, &key, from).unwrap();
        link.send_json(ATTACH, &Attach { home_pid, pid: 4242, epoch, frozen: None, stream: 1 }).unwrap();
        link.recv().unwrap()
    })
    .join()
    .unwrap()
}

#[test]
fn a_job_link_from_a_node_or_generation_the_record_does_not_name_is_refused() {
    use rmosix_migd::protocol::REFUSED;
    let c = Cluster::up(Spec::new("attach", 3, bin_dir_of_current_test())).unwrap();
    let u = test_user().unwrap();
    let mut child = c
        .command_as(1, &u, "mosrun")
        .unwrap()
        .args(["-N", "2", "/usr/bin/python3", "-c", HOLDER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    let lines = Lines::of(&mut child);
    lines.wait_for(5);
    // `-N 2` starts it at home and moves it there at once.
    wait_until("the job running on node 2 alone", PATIENCE, || {
        c.processes(2, "python3").len() == 1 && c.processes(1, "python3").is_empty()
    });
    // Node 3 holds the cluster key, but home's record names node 2, generation 1.
    let (kind, why) = attach_as(&c, 3, pid, 1);
    assert_eq!(kind, REFUSED, "{}", String::from_utf8_lossy(&why));
    assert!(String::from_utf8_lossy(&why).contains("not at node 3 generation 1"), "{}", String::from_utf8_lossy(&why));
    // Node 2 itself, for a generation that does not exist.
    let (kind, _) = attach_as(&c, 2, pid, 7);
    assert_eq!(kind, REFUSED);
    // The job's real link is untouched: its output still arrives, whole, and its status.
    drop(child.stdin.take());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let expected: String = (0..100).fold(String::new(), |s, i| s + &i.to_string() + "\n");
    assert_eq!(lines.finish(), expected);
}
