//! The short fuzz run of `cargo xtask test`, on the stable toolchain: every seed, every input kept in
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`, and a fixed number of deterministic mutations
//! of them, through each target; and no single allocation larger than the largest frame a decoder
//! accepts, on the thread that decodes.
//!
//! A failing input is written under the target directory and named in the failure, ready to be copied to
//! `fuzz/regressions/<target>/` once fixed, where every later run replays it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;

use rmosix_fuzz_harness::mutate::{Rng, mutate};
use rmosix_fuzz_harness::{Target, input_name, kept_input_dirs, target};

/// The largest allocation any decoder may make for one input: the 4 MiB frame limit of the control
/// protocol and the migd channel, and a little framing.
const LARGEST_ALLOCATION: usize = (4 << 20) + (64 << 10);

/// The longest mutated input.
const MAX_LEN: usize = 64 << 10;

thread_local! {
    /// The largest allocation this thread made since it was last reset.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, noting the largest allocation of each thread.
struct Watching;

fn note(size: usize) {
    // `try_with`: a thread being torn down still allocates.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// SAFETY: every call goes to the system allocator unchanged; only the size is noted.
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Watching = Watching;

/// Runs one input; on a broken promise or an oversized allocation, keeps the input and fails naming it.
fn run_one(target: &Target, input: &[u8]) {
    LARGEST.with(|largest| largest.set(0));
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    let largest = LARGEST.with(Cell::get);
    if result.is_ok() && largest <= LARGEST_ALLOCATION {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures").join(target.name);
    let path = dir.join(input_name(input));
    let kept = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, input));
    let what = if result.is_err() {
        "broke a promise (see the panic above)".to_owned()
    } else {
        format!("made an allocation of {largest} bytes, more than {LARGEST_ALLOCATION}")
    };
    panic!(
        "{}: an input of {} bytes {what}; input kept in {} ({kept:?}), first bytes {:02x?}",
        target.name,
        input.len(),
        path.display(),
        &input[..input.len().min(64)]
    );
}

/// Every kept input of a target: its seeds, then the files of its corpus and regression directories.
fn kept_inputs(target: &Target) -> Vec<Vec<u8>> {
    let mut inputs = (target.seeds)();
    for dir in kept_input_dirs(target.name) {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut paths: Vec<PathBuf> = entries.map(|e| e.expect("a corpus entry").path()).collect();
        paths.sort();
        for path in paths {
            inputs.push(std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display())));
        }
    }
    inputs
}

fn replay(name: &str, mutations: usize) {
    let target = target(name).unwrap_or_else(|| panic!("no fuzz target {name}"));
    let inputs = kept_inputs(target);
    assert!(!inputs.is_empty(), "{name} has no seeds");
    for input in &inputs {
        run_one(target, input);
    }
    let mut rng = Rng::for_name(name);
    for _ in 0..mutations {
        let (a, b) = (&inputs[rng.below(inputs.len())], &inputs[rng.below(inputs.len())]);
        run_one(target, &mutate(&mut rng, a, b, target.tokens, MAX_LEN));
    }
    eprintln!("{name}: {} kept inputs and {mutations} mutations passed", inputs.len());
}

#[test]
fn fuzz_corpus_infod_datagram() {
    replay("infod_datagram", 5000);
}

#[test]
fn fuzz_corpus_cluster_map() {
    replay("cluster_map", 5000);
}

#[test]
fn fuzz_corpus_config() {
    replay("config", 5000);
}

#[test]
fn fuzz_corpus_control_frames() {
    replay("control_frames", 3000);
}

#[test]
fn fuzz_corpus_infod_query() {
    replay("infod_query", 5000);
}

#[test]
fn fuzz_corpus_migd_messages() {
    replay("migd_messages", 5000);
}

#[test]
fn fuzz_corpus_migd_handshake() {
    replay("migd_handshake", 3000);
}

#[test]
fn fuzz_corpus_migd_channel() {
    replay("migd_channel", 1500);
}

#[test]
fn fuzz_corpus_image_stream() {
    replay("image_stream", 1500);
}

#[test]
fn every_target_is_replayed() {
    let source = include_str!("replay.rs");
    for t in rmosix_fuzz_harness::TARGETS {
        assert!(source.contains(&format!("fn fuzz_corpus_{}()", t.name)), "{} is not replayed", t.name);
    }
}
