//! `cargo xtask bench migrate`: what `migrate` costs a job, beside plain `criu dump` + `criu restore` by the
//! CLI on tmpfs in the same run; and what encrypting the images costs the move.
//!
//! A local 2-node cluster runs migd on each node; `mosrun rmx-job mem SIZE ...` starts a job on node 1 and
//! `migrate PID 2` moves it. The freeze time is what migd reports (from the start of the dump until the
//! destination may run the job); the total is the wall time of the `migrate` command. After each move the
//! job runs to its end at the deputy, and its output is checked against an unmoved run.
//!
//! Encryption: migd always encrypts, so its cost is measured on the transfer alone, in the same run:
//! `transfer::pack` and `transfer::unpack` of one image set over TCP loopback, encrypted (AES-256-GCM, what
//! migd sends) and authenticated only (a keyed BLAKE3 tag per record, what image streams had before), the
//! two interleaved on the same files. Each end's thread CPU time is measured beside the wall time: on a
//! shared 2-core machine the wall time mostly measures the other load, while CPU time is what the work
//! costs. In a move the two ends run on different nodes' CPUs at once, so the transfer grows by at most the
//! larger of the two ends' extra CPU time; the summary sets that against the freeze of the move of the same
//! size measured above.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Args;
use rmosix_checkpoint::images::ImageDir;
use rmosix_checkpoint::transfer::{self, Limits, Protection, StreamKey};
use rmosix_testcluster::Cluster;

use crate::benchmarks::{lines, load_average, move_cluster, until_filled, verdict};

use crate::bench_checkpoint::{PLAIN_TMPFS, baseline, job_args, reference_output};

/// Options of `cargo xtask bench migrate`.
#[derive(Debug, Args)]
pub struct MigrateBenchArgs {
    /// Resident sizes of the job, MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [64, 256, 1024, 2048])]
    pub sizes: Vec<u64>,
    /// Runs per size (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Image set sizes of the encryption measurement, MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [256, 1024])]
    pub transfer_sizes: Vec<u64>,
    /// Transfers per image set size and protection in the encryption measurement (the median is reported).
    #[arg(long, default_value_t = 7)]
    pub transfer_runs: usize,
    /// Do not write BENCHMARKS.md.
    #[arg(long)]
    pub no_write: bool,
}

/// The most encryption may add to a move's freeze, in percent of the freeze without it.
const TARGET_PERCENT: f64 = 15.0;

#[derive(Debug, Clone, Copy)]
struct Move {
    frozen: Duration,
    total: Duration,
}

/// The median moves of one size.
#[derive(Debug, Clone, Copy)]
struct MoveRow {
    size: u64,
    cli: Duration,
    median: Move,
}

/// One transfer: wall time, and the CPU time of each end's thread.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    wall: Duration,
    sender: Duration,
    receiver: Duration,
}

impl Transfer {
    /// The median of each figure on its own.
    fn median(runs: &[Transfer]) -> Transfer {
        Transfer {
            wall: median(runs.iter().map(|t| t.wall).collect()),
            sender: median(runs.iter().map(|t| t.sender).collect()),
            receiver: median(runs.iter().map(|t| t.receiver).collect()),
        }
    }
}

/// The median transfers of one image set size.
#[derive(Debug, Clone, Copy)]
struct TransferRow {
    size: u64,
    authenticated: Transfer,
    encrypted: Transfer,
    /// Median over the runs of encrypted less authenticated-only CPU time of the sender, ms: each run's two
    /// transfers ran back to back, so the difference cancels most of the other load's drift.
    added_sender: f64,
    /// The same for the receiver.
    added_receiver: f64,
}

impl TransferRow {
    /// What encryption adds to the busier end's CPU time, in ms: the most it can add to a move.
    fn added_ms(&self) -> f64 {
        self.added_sender.max(self.added_receiver)
    }
}

/// The median of each run's difference between the encrypted and the authenticated-only transfer.
fn paired_difference(authenticated: &[Transfer], encrypted: &[Transfer], end: fn(&Transfer) -> Duration) -> f64 {
    let mut differences: Vec<f64> =
        authenticated.iter().zip(encrypted).map(|(a, e)| ms(end(e)) - ms(end(a))).collect();
    differences.sort_by(f64::total_cmp);
    differences[differences.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `size` MiB as a float, for rates.
fn mib(size: u64) -> f64 {
    f64::from(u32::try_from(size).unwrap_or(u32::MAX))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs the benchmark.
pub fn run(args: &MigrateBenchArgs) -> anyhow::Result<()> {
    ensure!(args.runs >= 1 && args.transfer_runs >= 1, "--runs and --transfer-runs must be at least 1");
    crate::setup::run()?;
    crate::build_release()?;
    // Before the cluster, so that no job of ours competes with the transfers.
    let load_before = load_average();
    let transfers = measure_transfers(&args.transfer_sizes, args.transfer_runs)?;
    let load = format!("{load_before} before the transfers, {} after", load_average());
    let moves = measure_moves(&args.sizes, args.runs)?;

    let (moves_table, headline) = moves_table(&moves);
    let (encryption_table, encryption) = encryption_table(&transfers, &moves);
    let (size, cli, m, ratio) = headline.context("no sizes measured")?;
    let migrate_summary = format!(
        "migrate: {size} MiB job frozen {:.0} ms = {ratio:.2}x CLI criu dump+restore {:.0} ms, migrate total {:.0} ms (target <= 1.5x at 1024 MiB): {}",
        ms(m.frozen),
        ms(cli),
        ms(m.total),
        verdict(size == 1024 && ratio <= 1.5)
    );
    let body = format!(
        "Reproduce: `cargo xtask bench migrate` (release build; `--sizes 64,256,1024,2048 --runs 3 --transfer-sizes \
         256,1024 --transfer-runs 7`). Run {}; the median of {} runs per size.\n\n\
         A local 2-node cluster runs infod and migd on each node. `mosrun rmx-job mem SIZE ...` starts a job on \
         node 1; once it has filled its memory, `migrate PID 2` moves it: migd dumps it (left frozen), offers it \
         to node 2 over the encrypted, authenticated migration connection, streams the images (AES-256-GCM \
         records), node 2 restores them stopped, checks the owner, node 1 kills its copy and node 2 lets the job \
         run; its output then flows home to the deputy. *Frozen*: as migd measures it, from the start of the \
         dump until the destination may run the job. *Total*: wall time of the `migrate` command. *CLI*: the \
         same program as a plain process, `criu dump` then `criu restore -d` on /dev/shm, no transfer. Every \
         moved job ran to its end and its output at the deputy matched an unmoved run.\n\n{moves_table}\n\
         ### What encryption costs\n\n\
         `transfer::pack` and `transfer::unpack` of an image set shaped like a dump (one pages file of random \
         bytes, three small files) from /dev/shm to /dev/shm over TCP loopback (`TCP_NODELAY`, sender and \
         receiver on their own threads), in the same run: *encrypted* is what migd sends (AES-256-GCM from \
         `ring`, 1 MiB records); *authenticated only* is the same stream with a keyed BLAKE3 tag per record \
         instead, as image streams were before. The two alternate, the median of {} transfers each, after one \
         unmeasured transfer each (the first writes to fresh tmpfs pages are slow on these machines). *Wall*: \
         until both ends are done; *sender*, *receiver*: CPU time of each end's thread \
         (`CLOCK_THREAD_CPUTIME_ID`). The machine was shared with other work (load average {load}), which \
         the wall times measure more than the transfer; CPU time is what the work itself costs. In a move the \
         two ends run at once on different nodes' CPUs, so encryption makes the transfer longer by at most \
         the larger of the two ends' extra CPU time: *encryption adds*. *CPU added* is the median of each run's \
         difference (its two transfers ran back to back), not the difference of the medians. *Share of the \
         freeze*: that, against \
         the freeze of the move of that size above less that addition (the same move without encryption).\n\n\
         {encryption_table}\n\
         Summary: `{migrate_summary}`\n\nSummary: `{encryption}`\n",
        crate::benchmarks::machine(),
        args.runs,
        args.transfer_runs,
    );
    println!("{body}");
    if !args.no_write {
        crate::benchmarks::update_section("migrate", "migrate: moving a job between two nodes", &body)?;
    }
    println!("{migrate_summary}");
    println!("{encryption}");
    Ok(())
}

/// Moves jobs of each size between the nodes of a local cluster, beside the CLI baseline.
fn measure_moves(sizes: &[u64], runs: usize) -> anyhow::Result<Vec<MoveRow>> {
    let bins = crate::release_bin_dir();
    let criu = rmosix_testcluster::criu_path();
    let cluster = move_cluster("benchm", sizes.iter().copied().max().unwrap_or(0), &bins)?;
    let mut rows = Vec::new();
    for &size in sizes {
        let reference = reference_output(&bins, size)?;
        let mut cli = Vec::new();
        let mut moves = Vec::new();
        for run in 0..runs {
            let b = baseline(&criu, &bins, size, Path::new(PLAIN_TMPFS))?;
            cli.push(b.dump + b.restore);
            let m = migrate_once(&cluster, &bins, size, &reference)?;
            eprintln!(
                "bench migrate: {size} MiB run {}: CLI dump+restore {:.0} ms; migrate frozen {:.0} ms, total {:.0} ms",
                run + 1,
                ms(b.dump + b.restore),
                ms(m.frozen),
                ms(m.total)
            );
            moves.push(m);
        }
        moves.sort_by_key(|m| m.frozen);
        rows.push(MoveRow { size, cli: median(cli), median: moves[moves.len() / 2] });
    }
    Ok(rows)
}

/// The moves' table, and the headline row: 1024 MiB, or the first size.
fn moves_table(rows: &[MoveRow]) -> (String, Option<(u64, Duration, Move, f64)>) {
    let mut table = String::from(
        "| resident | CLI dump+restore | migrate: frozen | migrate: total | frozen / CLI |\n|---|---|---|---|---|\n",
    );
    let mut headline = None;
    for row in rows {
        let m = row.median;
        let ratio = m.frozen.as_secs_f64() / row.cli.as_secs_f64();
        let _ = writeln!(
            table,
            "| {} MiB | {:.0} ms | {:.0} ms | {:.0} ms | {ratio:.2}x |",
            row.size,
            ms(row.cli),
            ms(m.frozen),
            ms(m.total)
        );
        if row.size == 1024 || headline.is_none() {
            headline = Some((row.size, row.cli, m, ratio));
        }
    }
    (table, headline)
}

/// The encryption table and its summary line: what encryption adds to the transfer of each size, and to the
/// freeze of the move of that size.
fn encryption_table(transfers: &[TransferRow], moves: &[MoveRow]) -> (String, String) {
    let mut table = String::from(
        "| image set | authenticated only: wall, sender, receiver | encrypted: wall, sender, receiver | CPU added: sender, receiver | encryption adds | encrypted, per CPU of the busier end | move frozen | share of the freeze |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let figures = |t: &Transfer| format!("{:.0} ms, {:.0} ms, {:.0} ms", ms(t.wall), ms(t.sender), ms(t.receiver));
    let mut headline = None;
    for row in transfers {
        let added = row.added_ms();
        let busier = row.encrypted.sender.max(row.encrypted.receiver);
        let throughput = mib(row.size) * 1_048_576e-9 / busier.as_secs_f64();
        let frozen = moves.iter().find(|m| m.size == row.size).map(|m| ms(m.median.frozen));
        let share = frozen.map(|f| 100.0 * added / (f - added));
        let _ = writeln!(
            table,
            "| {} MiB | {} | {} | {:+.0} ms, {:+.0} ms | {added:+.0} ms | {throughput:.2} GB/s | {} | {} |",
            row.size,
            figures(&row.authenticated),
            figures(&row.encrypted),
            row.added_sender,
            row.added_receiver,
            frozen.map_or_else(|| "not measured".to_owned(), |f| format!("{f:.0} ms")),
            share.map_or_else(|| "-".to_owned(), |s| format!("{s:+.1} %")),
        );
        if let (Some(frozen), Some(share)) = (frozen, share)
            && (row.size == 1024 || headline.is_none())
        {
            headline = Some((row, added, frozen, share));
        }
    }
    let summary = match headline {
        Some((row, added, frozen, share)) => format!(
            "migrate encryption: AES-256-GCM adds at most {added:.0} ms to moving {} MiB of images (CPU of the \
             sender {:+.0} ms, of the receiver {:+.0} ms), {share:.1} % of that move's freeze without it ({:.0} ms) \
             (target <= {TARGET_PERCENT:.0} % at 1024 MiB): {}",
            row.size,
            row.added_sender,
            row.added_receiver,
            frozen - added,
            verdict(row.size == 1024 && share <= TARGET_PERCENT)
        ),
        None => format!(
            "migrate encryption: no size measured both as a move and as a transfer (target <= {TARGET_PERCENT:.0} % \
             at 1024 MiB): {}",
            verdict(false)
        ),
    };
    (table, summary)
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which lives through the call.
    let done = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut now) };
    assert_eq!(done, 0, "CLOCK_THREAD_CPUTIME_ID is always there on Linux");
    Duration::new(u64::try_from(now.tv_sec).unwrap_or(0), u32::try_from(now.tv_nsec).unwrap_or(0))
}

/// Transfers image sets of each size, encrypted and authenticated only, interleaved.
fn measure_transfers(sizes: &[u64], runs: usize) -> anyhow::Result<Vec<TransferRow>> {
    const ORDERS: [[Protection; 2]; 2] =
        [[Protection::Authenticated, Protection::Encrypted], [Protection::Encrypted, Protection::Authenticated]];
    let mut rows = Vec::new();
    for &size in sizes {
        let source = image_set(size)?;
        for protection in ORDERS[0] {
            transfer_once(source.path(), protection)?;
        }
        let (mut authenticated, mut encrypted) = (Vec::new(), Vec::new());
        for run in 0..runs {
            for protection in ORDERS[run % 2] {
                let took = transfer_once(source.path(), protection)?;
                eprintln!(
                    "bench migrate: transfer of {size} MiB, {protection:?}, run {}: wall {:.0} ms, sender CPU {:.0} ms, receiver CPU {:.0} ms",
                    run + 1,
                    ms(took.wall),
                    ms(took.sender),
                    ms(took.receiver)
                );
                match protection {
                    Protection::Authenticated => authenticated.push(took),
                    Protection::Encrypted => encrypted.push(took),
                }
            }
        }
        rows.push(TransferRow {
            size,
            authenticated: Transfer::median(&authenticated),
            encrypted: Transfer::median(&encrypted),
            added_sender: paired_difference(&authenticated, &encrypted, |t| t.sender),
            added_receiver: paired_difference(&authenticated, &encrypted, |t| t.receiver),
        });
    }
    Ok(rows)
}

/// An image set on /dev/shm shaped like a dump: a pages file of `size` MiB of random bytes (which no layer
/// can compress or skip), and three small files.
fn image_set(size: u64) -> anyhow::Result<ImageDir> {
    let dir = ImageDir::create(Path::new(PLAIN_TMPFS))?;
    let mut pages = std::fs::File::create(dir.path().join("pages-1.img"))?;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ size;
    let mut chunk = vec![0u8; 16 << 20];
    let mut left = size << 20;
    while left > 0 {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = usize::try_from(left.min(chunk.len() as u64))?;
        pages.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    for (name, len) in [("core-1.img", 8 << 10), ("mm-1.img", 4 << 10), ("inventory.img", 64)] {
        std::fs::write(dir.path().join(name), &chunk[..len])?;
    }
    Ok(dir)
}

/// One pack and unpack of `source` over TCP loopback with `protection`.
fn transfer_once(source: &Path, protection: Protection) -> anyhow::Result<Transfer> {
    let dest = ImageDir::create(Path::new(PLAIN_TMPFS))?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let key: StreamKey = rand::random();
    let start = Instant::now();
    let (arrived, sender_cpu, receiver_cpu) = std::thread::scope(|scope| {
        let sender = scope.spawn(|| -> anyhow::Result<(transfer::Stats, Duration)> {
            let cpu = thread_cpu();
            let mut stream = TcpStream::connect(address)?;
            stream.set_nodelay(true)?;
            let sent = transfer::pack_with(source, &mut stream, &key, protection)?;
            Ok((sent, thread_cpu().saturating_sub(cpu)))
        });
        let cpu = thread_cpu();
        let (mut conn, _) = listener.accept()?;
        conn.set_nodelay(true)?;
        let arrived = transfer::unpack_with(&mut conn, dest.path(), &key, &Limits::default(), protection)?;
        let receiver_cpu = thread_cpu().saturating_sub(cpu);
        let (sent, sender_cpu) = sender.join().map_err(|_| anyhow::anyhow!("the sender panicked"))??;
        ensure!(sent.checksum == arrived.checksum, "the two ends disagree on the stream");
        anyhow::Ok((arrived, sender_cpu, receiver_cpu))
    })?;
    let wall = start.elapsed();
    if arrived.files != 4 {
        bail!("{} files arrived, 4 were sent", arrived.files);
    }
    Ok(Transfer { wall, sender: sender_cpu, receiver: receiver_cpu })
}

fn migrate_once(cluster: &Cluster, bins: &Path, size: u64, reference: &[String]) -> anyhow::Result<Move> {
    let mut deputy = cluster
        .command(1, "mosrun")?
        .arg(bins.join("rmx-job"))
        .args(job_args(size))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start mosrun")?;
    let rx = lines(deputy.stdout.take().context("no stdout")?);
    let mut seen = until_filled(&rx)?;
    let start = Instant::now();
    let said = cluster.command(1, "migrate")?.args([deputy.id().to_string().as_str(), "2"]).output()?;
    let total = start.elapsed();
    let text = String::from_utf8_lossy(&said.stdout).into_owned();
    ensure!(said.status.success(), "migrate failed: {}", String::from_utf8_lossy(&said.stderr));
    // "moved P from node 1 to node 2 in 0.41 s (frozen 0.35 s)"
    let frozen: f64 = text
        .split("(frozen ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("cannot read the freeze time in {text:?}"))?;
    seen.extend(rx.iter());
    let status = deputy.wait()?;
    if !status.success() {
        bail!("the moved job ended with {status}");
    }
    ensure!(seen == reference, "the moved job's output differs from an unmoved run's ({} lines vs {})", seen.len(), reference.len());
    Ok(Move { frozen: Duration::from_secs_f64(frozen), total })
}
