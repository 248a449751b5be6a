//! `rmx-job MODE ...`: deterministic test programs for checkpoint/restore and migration tests. Every mode
//! prints progress lines and a final checksum that depend only on its arguments, so a run that was moved
//! any number of times must print exactly what an unmoved run prints.
//!
//! Modes:
//! - `spin STEPS WORK`: CPU-bound loop.
//! - `threads N STEPS WORK`: N long-lived threads computing in lock step (the process has N + 1 threads
//!   throughout).
//! - `files IN OUT STEPS WORK`: reads IN bit by bit and writes OUT as it goes (file offsets must survive).
//! - `fork STEPS WORK`: a child computes, the parent prints what the child sends through a pipe.
//! - `tcp STEPS WORK`: like spin while holding a listening TCP socket.
//! - `mem MIB STEPS WORK`: like spin over MIB MiB of memory it filled.
//! - `echo`: copies stdin to stdout line by line, then prints a checksum of what it read.

use std::io::{BufRead as _, Read as _, Seek as _, Write as _};
use std::sync::mpsc;

fn mix(mut x: u64, work: u64) -> u64 {
    for _ in 0..work {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
    }
    x
}

fn arg(args: &[String], i: usize, name: &str) -> u64 {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or_else(|| {
        eprintln!("rmx-job: missing or bad {name}");
        std::process::exit(2)
    })
}

fn line(out: &mut impl std::io::Write, text: &str) {
    writeln!(out, "{text}").and_then(|()| out.flush()).unwrap_or_else(|_| std::process::exit(3));
}

#[expect(clippy::too_many_lines, reason = "one match arm per mode, each a small program")]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut out = std::io::stdout().lock();
    match args.first().map(String::as_str) {
        Some("spin") => {
            let (steps, work) = (arg(&args, 1, "STEPS"), arg(&args, 2, "WORK"));
            let mut x = 1;
            for i in 0..steps {
                x = mix(x ^ i, work);
                line(&mut out, &format!("step {i} {x:016x}"));
            }
            line(&mut out, &format!("done {x:016x}"));
        }
        Some("tcp") => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let (steps, work) = (arg(&args, 1, "STEPS"), arg(&args, 2, "WORK"));
            let mut x = 1;
            for i in 0..steps {
                x = mix(x ^ i, work);
                line(&mut out, &format!("step {i} {x:016x}"));
            }
            drop(listener);
            line(&mut out, &format!("done {x:016x}"));
        }
        Some("threads") => {
            let (n, steps, work) = (arg(&args, 1, "N"), arg(&args, 2, "STEPS"), arg(&args, 3, "WORK"));
            // One long-lived worker per value, fed in lock step: from before the first line to after the
            // last, the process has N + 1 threads, so a dump at any moment sees a multi-threaded process.
            let workers: Vec<(mpsc::Sender<u64>, mpsc::Receiver<u64>)> = (0..n)
                .map(|_| {
                    let (to_worker, inbox) = mpsc::channel::<u64>();
                    let (outbox, from_worker) = mpsc::channel();
                    std::thread::spawn(move || {
                        for x in inbox {
                            if outbox.send(mix(x, work)).is_err() {
                                break;
                            }
                        }
                    });
                    (to_worker, from_worker)
                })
                .collect();
            let mut state: Vec<u64> = (1..=n).collect();
            for i in 0..steps {
                for ((to_worker, _), &x) in workers.iter().zip(&state) {
                    to_worker.send(x ^ i).expect("worker");
                }
                state = workers.iter().map(|(_, from_worker)| from_worker.recv().expect("worker")).collect();
                let sum = state.iter().fold(0u64, |a, &b| a.rotate_left(5) ^ b);
                line(&mut out, &format!("step {i} {sum:016x}"));
            }
            let sum = state.iter().fold(0u64, |a, &b| a.rotate_left(5) ^ b);
            line(&mut out, &format!("done {sum:016x}"));
        }
        Some("files") => {
            let mut input = std::fs::File::open(&args[1]).expect("open IN");
            let mut output = std::fs::File::create(&args[2]).expect("create OUT");
            let (steps, work) = (arg(&args, 3, "STEPS"), arg(&args, 4, "WORK"));
            let mut x = 1;
            let mut chunk = [0u8; 16];
            for i in 0..steps {
                let n = input.read(&mut chunk).expect("read");
                x = mix(x ^ chunk[..n].iter().fold(i, |a, &b| a.rotate_left(8) ^ u64::from(b)), work);
                writeln!(output, "{i} {x:016x}").expect("write OUT");
                let pos = input.stream_position().expect("offset");
                line(&mut out, &format!("step {i} {x:016x} at {pos}"));
            }
            output.sync_all().expect("sync");
            line(&mut out, &format!("done {x:016x}"));
        }
        Some("fork") => {
            let (steps, work) = (arg(&args, 1, "STEPS"), arg(&args, 2, "WORK"));
            let (reader, writer) = std::io::pipe().expect("pipe");
            // SAFETY: single-threaded here; the child only computes and writes.
            match unsafe { libc::fork() } {
                0 => {
                    drop(reader);
                    let mut w = std::io::BufWriter::new(writer);
                    let mut x = 7;
                    for i in 0..steps {
                        x = mix(x ^ i, work);
                        writeln!(w, "{x:016x}").and_then(|()| w.flush()).expect("pipe write");
                    }
                    std::process::exit(0);
                }
                -1 => panic!("fork failed"),
                child => {
                    drop(writer);
                    let mut last = String::new();
                    for (i, l) in std::io::BufReader::new(reader).lines().enumerate() {
                        last = l.expect("pipe read");
                        line(&mut out, &format!("step {i} {last} from child"));
                    }
                    let mut status = 0;
                    // SAFETY: waiting for our own child.
                    unsafe { libc::waitpid(child, &raw mut status, 0) };
                    line(&mut out, &format!("done {last} child status {status}"));
                }
            }
        }
        Some("mem") => {
            let (mib, steps, work) = (arg(&args, 1, "MIB"), arg(&args, 2, "STEPS"), arg(&args, 3, "WORK"));
            let words = usize::try_from(mib * (1 << 20) / 8).expect("size");
            let mut mem: Vec<u64> = Vec::with_capacity(words);
            let mut x = 3u64;
            for _ in 0..words {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                mem.push(x);
            }
            line(&mut out, &format!("filled {mib} MiB"));
            let mut acc = 1;
            for i in 0..steps {
                let idx = usize::try_from(mix(acc ^ i, 1) % words as u64).expect("index");
                mem[idx] = mix(mem[idx] ^ acc, work);
                acc ^= mem[idx];
                line(&mut out, &format!("step {i} {acc:016x}"));
            }
            let sum = mem.iter().fold(acc, |a, &b| a.rotate_left(1) ^ b);
            line(&mut out, &format!("done {sum:016x}"));
        }
        Some("echo") => {
            let mut sum = 0u64;
            for l in std::io::stdin().lock().lines() {
                let l = l.expect("stdin");
                sum = mix(sum ^ l.bytes().fold(0u64, |a, b| a.rotate_left(8) ^ u64::from(b)), 1);
                line(&mut out, &format!("echo {l}"));
            }
            line(&mut out, &format!("done {sum:016x}"));
        }
        _ => {
            eprintln!("usage: rmx-job spin|threads|files|fork|tcp|mem|echo ...");
            std::process::exit(2);
        }
    }
}
