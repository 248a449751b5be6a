//! `cargo xtask demo`: the main job on the built-in default, a local 4-node cluster on this machine.
//!
//! It starts the cluster, waits until every node knows every other, puts a CPU hog on node 2 and shows node
//! 4 noticing it and steering new work elsewhere, kills node 3's infod and shows the cluster marking it down,
//! then brings it back. Then a job an ordinary user starts with `mosrun` on node 1 (python3, counting primes) is
//! moved to node 2, node 3 and home while it runs, and its output at the deputy is compared with an unmoved run's.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use rmosix_testcluster::{Cluster, Spec};

/// Options of `cargo xtask demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of nodes.
    #[arg(long, short, default_value_t = 4)]
    nodes: u32,
    /// Leave the cluster running afterwards (as cluster "demo"; stop it with `cargo xtask cluster down --name demo`).
    #[arg(long)]
    keep: bool,
}

fn step(start: Instant, text: &str) {
    println!("\n[{:5.1}s] {text}", start.elapsed().as_secs_f64());
}

fn mosctl(cluster: &Cluster, node: u32, args: &[&str]) -> anyhow::Result<String> {
    let out = cluster.command(node, "mosctl")?.args(args).output().context("cannot run mosctl")?;
    anyhow::ensure!(out.status.success(), "mosctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes >= 4, "the demo needs at least 4 nodes");
    crate::setup::run()?;
    crate::build()?;
    let start = Instant::now();
    step(start, &format!("starting a {}-node cluster (network namespaces 10.213.0.1 ...)", args.nodes));
    let mut cluster = Cluster::up(Spec::new("demo", args.nodes, crate::bin_dir()))?;
    if args.keep {
        cluster.keep();
    }
    let took = cluster.wait_for(Duration::from_secs(15), "every node knows every node", |_, v| {
        v.nodes.iter().all(|n| n.alive && n.load.is_some())
    })?;
    step(start, &format!("every node knows every other node's load after {:.1}s; node 1 sees:", took.as_secs_f64()));
    print!("{}", mosctl(&cluster, 1, &["status"])?);

    step(start, "starting two CPU-bound loops on node 2");
    let mut hogs = Vec::new();
    for _ in 0..2 {
        hogs.push(
            cluster
                .command(2, "sh")?
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .spawn()
                .context("cannot start the CPU hog")?,
        );
    }
    let took = cluster.wait_for(Duration::from_secs(20), "node 4 sees node 2 busy", |i, v| {
        i != 4 || v.nodes.iter().any(|n| n.id == 2 && n.load.is_some_and(|l| l > 1.5))
    })?;
    step(start, &format!("node 4 saw node 2's load rise after {:.1}s; node 4 sees:", took.as_secs_f64()));
    print!("{}", mosctl(&cluster, 4, &["status"])?);
    let picks: Vec<String> =
        (0..4).map(|_| mosctl(&cluster, 4, &["best"]).map(|s| s.trim().to_owned())).collect::<Result<_, _>>()?;
    println!("`mosctl best` on node 4, four times in a row (spreading, avoiding node 2): {}", picks.join(" "));
    for mut hog in hogs {
        let _ = hog.kill();
        let _ = hog.wait();
    }

    step(start, "killing node 3's infod");
    cluster.kill_infod(3)?;
    let others: Vec<u32> = cluster.node_ids().filter(|&i| i != 3).collect();
    let took = cluster.wait_for_nodes(&others, Duration::from_secs(20), "node 3 down everywhere", |_, v| {
        v.nodes.iter().any(|n| n.id == 3 && !n.alive)
    })?;
    step(start, &format!("node 3 is down everywhere after {:.1}s; node 1 sees:", took.as_secs_f64()));
    print!("{}", mosctl(&cluster, 1, &["status"])?);

    step(start, "restarting node 3's infod");
    cluster.start_infod(3)?;
    let took = cluster.wait_for(Duration::from_secs(15), "node 3 back", |_, v| v.nodes.iter().all(|n| n.alive))?;
    step(start, &format!("node 3 is back everywhere after {:.1}s; node 3 sees:", took.as_secs_f64()));
    print!("{}", mosctl(&cluster, 3, &["status"])?);
    migration(&cluster, start)?;
    if args.keep {
        println!("\ncluster \"demo\" left running: cargo xtask cluster exec --name demo 1 -- mosctl status");
    } else {
        println!("\nremoving the cluster");
    }
    Ok(())
}

/// A CPU-bound Python program: counts primes in 400 steps, printing each step.
const PRIMES: &str = "
n, found = 2, 0
for step in range(400):
    limit = n + 4000
    while n < limit:
        if all(n % d for d in range(2, int(n ** 0.5) + 1)):
            found += 1
        n += 1
    print(step, n, found, flush=True)
";

/// A job an ordinary user starts with mosrun on node 1 travels to node 2, node 3 and home while it runs; its
/// deputy gets all of its output.
fn migration(cluster: &Cluster, start: Instant) -> anyhow::Result<()> {
    let user = rmosix_testcluster::user::test_user()?;
    let args = ["/usr/bin/python3", "-c", PRIMES];
    // What an unmoved run prints, computed meanwhile, as the same user.
    let reference = {
        let mut plain = cluster.command_as(1, &user, args[0])?;
        plain.args(&args[1..]);
        std::thread::spawn(move || plain.output().map(|o| o.stdout))
    };
    step(start, &format!("user {} runs `mosrun python3` on node 1: a CPU-bound job counting primes in 400 steps", user.name));
    let mut deputy = cluster.command_as(1, &user, "mosrun")?.args(args).stdout(Stdio::piped()).spawn()?;
    let pid = deputy.id().to_string();
    let rx = crate::benchmarks::lines(deputy.stdout.take().context("no stdout")?);
    let mut seen: Vec<String> = Vec::new();
    for target in ["2", "3", "home"] {
        for _ in 0..60 {
            seen.push(rx.recv_timeout(Duration::from_mins(1)).context("the job stopped printing")?);
        }
        println!("  deputy has {} lines, last: {}", seen.len(), seen.last().map_or("", String::as_str));
        let said = cluster.command_as(1, &user, "migrate")?.args([pid.as_str(), target]).output()?;
        anyhow::ensure!(said.status.success(), "migrate failed: {}", String::from_utf8_lossy(&said.stderr));
        print!("  {}$ migrate {pid} {target}\n  {}", user.name, String::from_utf8_lossy(&said.stdout));
    }
    seen.extend(rx.iter());
    let status = deputy.wait()?;
    let expected = reference.join().map_err(|_| anyhow::anyhow!("reference run panicked"))?.context("cannot run python3")?;
    let mut got = seen.join("\n");
    got.push('\n');
    step(
        start,
        &format!(
            "the job ended (deputy exit status {}); {} lines, identical to an unmoved run: {}",
            status.code().unwrap_or(-1),
            seen.len(),
            if got.as_bytes() == expected.as_slice() { "yes" } else { "NO" }
        ),
    );
    anyhow::ensure!(got.as_bytes() == expected.as_slice(), "the moved job's output differs from an unmoved run's");
    Ok(())
}
