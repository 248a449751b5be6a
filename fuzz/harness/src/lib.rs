//! The bodies of rmosix's fuzz targets: one function per decoder that takes bytes from the network or from
//! users, and the promises that decoder makes, checked on every input.
//!
//! Two drivers call the same functions, so a property is written once:
//!
//! - cargo-fuzz (`fuzz/fuzz_targets/*.rs`, libFuzzer, nightly): `cargo xtask fuzz [TARGET]` runs a target for
//!   minutes with coverage feedback, keeps a minimized corpus in `fuzz/corpus/<target>/`, and copies any
//!   crashing input to `fuzz/regressions/<target>/`.
//! - the corpus replay (`tests/replay.rs`, stable, part of `cargo xtask test`): every seed, corpus entry and
//!   regression, plus a few thousand deterministic mutations of them, through each target.
//!
//! A target panics when a promise is broken (that is how libFuzzer and the test harness see a failure):
//! a decoder that panics on its own, an error where a success was due, a success where an error was due
//! (a tampered stream accepted), a round trip that changes the value, a file written outside its
//! directory. Each target's module doc lists what it checks. Inputs are plain bytes; the structured
//! targets read their structure from them with [`input::Input`], so libFuzzer's byte-level mutations stay
//! meaningful.

pub mod channel;
pub mod config;
pub mod control;
pub mod datagram;
pub mod handshake;
pub mod image;
pub mod input;
pub mod json;
pub mod map;
pub mod mutate;
pub mod protocol;
pub mod query;

use std::path::PathBuf;

/// One fuzz target: its name (the cargo-fuzz binary and the corpus directory), its body and its seeds.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Name of the cargo-fuzz binary and of the corpus directories.
    pub name: &'static str,
    /// What it feeds, for the list and RELIABILITY.md.
    pub feeds: &'static str,
    /// Runs one input; panics when a promise is broken.
    pub run: fn(&[u8]),
    /// Inputs built with the current encoders, so they stay valid when a format changes: the fuzzer starts
    /// from them and the replay always runs them.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Byte strings the deterministic mutator splices in (keywords, magic numbers).
    pub tokens: &'static [&'static [u8]],
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "infod_datagram",
        feeds: "infod datagrams (`wire::decode`), raw and validly signed",
        run: datagram::run,
        seeds: datagram::seeds,
        tokens: datagram::TOKENS,
    },
    Target {
        name: "cluster_map",
        feeds: "mosix.map text (`ClusterMap::parse`)",
        run: map::run,
        seeds: map::seeds,
        tokens: map::TOKENS,
    },
    Target {
        name: "config",
        feeds: "rmosix.toml text (`Config::parse`)",
        run: config::run,
        seeds: config::seeds,
        tokens: config::TOKENS,
    },
    Target {
        name: "control_frames",
        feeds: "migd's control socket: length + JSON frames (`control::recv`, `recv_with_fds`), `Request`, `Response`",
        run: control::run,
        seeds: control::seeds,
        tokens: control::TOKENS,
    },
    Target {
        name: "infod_query",
        feeds: "infod's query socket: JSON lines (`query::Request`, `query::Response`)",
        run: query::run,
        seeds: query::seeds,
        tokens: query::TOKENS,
    },
    Target {
        name: "migd_messages",
        feeds: "migd's JSON frame payloads (`Offer`, `Verdict`, `Attach`, `Moved`, `Go`, `Ask`, `RecordState`, ...)",
        run: protocol::run,
        seeds: protocol::seeds,
        tokens: protocol::TOKENS,
    },
    Target {
        name: "migd_handshake",
        feeds: "hostile bytes to a migd channel end (server or client)",
        run: handshake::run,
        seeds: handshake::seeds,
        tokens: handshake::TOKENS,
    },
    Target {
        name: "migd_channel",
        feeds: "two real migd channel ends, the bytes between them flipped, cut, dropped or replayed",
        run: channel::run,
        seeds: channel::seeds,
        tokens: &[],
    },
    Target {
        name: "image_stream",
        feeds: "image streams (`transfer::unpack_with`): hostile bytes, tampered packed sets, sealed hostile contents",
        run: image::run,
        seeds: image::seeds,
        tokens: image::TOKENS,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The fuzz project's directory (`fuzz/` at the workspace root).
pub fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("the harness lives in fuzz/").to_owned()
}

/// The directories whose files are inputs of `target` kept in the repository: the minimized corpus and
/// the inputs that once broke a promise.
pub fn kept_input_dirs(target: &str) -> [PathBuf; 2] {
    let fuzz = fuzz_dir();
    [fuzz.join("corpus").join(target), fuzz.join("regressions").join(target)]
}

/// A name for an input made from its contents (FNV-1a, 64 bits, in hex), for files of seeds and failures.
pub fn input_name(data: &[u8]) -> String {
    let hash = data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{hash:016x}")
}

/// The cluster key every target signs and checks with: a fixed one, so signed inputs in the corpus stay
/// valid across runs.
pub fn cluster_key() -> rmosix_common::key::ClusterKey {
    rmosix_common::key::ClusterKey::from_bytes(b"rmosix fuzzing cluster key, 32 b")
}

/// The key of image streams, fixed for the same reason.
pub const STREAM_KEY: [u8; 32] = *b"rmosix fuzzing image stream key!";
