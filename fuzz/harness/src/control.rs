//! Target `control_frames`: migd's control socket, where any local user sends `u32` length + JSON frames
//! (`control::recv`, and `control::recv_with_fds` for the first message of a session), and where mosrun
//! and migrate read migd's answers.
//!
//! The first input byte picks the reader (bit 0: `recv_with_fds` or `recv`) and the message type (bit 1:
//! `Request`, what migd decodes, or `Response`, what the tools decode). The rest is written to one end of a
//! Unix socket pair, which is then closed for writing, and messages are read from the other end until an
//! error.
//!
//! Checked: the readers return, whatever the bytes, and never allocate for a frame longer than
//! `MAX_FRAME` (the replay's allocator watches that); a frame refused as too large was; a message accepted
//! survives the round trip through `control::send` and `control::recv` unchanged.

use std::io::Write as _;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use rmosix_common::control::{
    self, ControlError, Hint, Refusal, Request, Response, Rlimit, Run, RunOptions, Target, Where,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Pieces of control frames worth splicing in.
pub const TOKENS: &[&[u8]] = &[
    br#"{"op":"run""#,
    br#"{"op":"signal","signo":2}"#,
    br#"{"op":"migrate","home_pid":1,"target":"home"}"#,
    br#"{"op":"reattach"}"#,
    br#"{"op":"guests"}"#,
    br#""reply":"moved""#,
    &[0, 0, 0x40, 0],
    &[0xff; 4],
];

/// The most bytes written into the socket pair: well below its buffer, so writing never blocks.
const MAX_INPUT: usize = 96 * 1024;

/// The most messages read from one input.
const MAX_MESSAGES: usize = 64;

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let with_fds = mode & 1 == 1;
    if mode & 2 == 0 {
        read_all::<Request>(&rest[..rest.len().min(MAX_INPUT)], with_fds);
    } else {
        read_all::<Response>(&rest[..rest.len().min(MAX_INPUT)], with_fds);
    }
}

fn read_all<T: Serialize + DeserializeOwned>(bytes: &[u8], with_fds: bool) {
    let (mut writer, mut reader) = UnixStream::pair().expect("a socket pair");
    writer.write_all(bytes).expect("writing into a socket pair with room");
    writer.shutdown(Shutdown::Write).expect("closing a socket pair for writing");
    for _ in 0..MAX_MESSAGES {
        let received = if with_fds {
            control::recv_with_fds::<T>(&mut reader).map(|(msg, fds)| {
                assert!(fds.is_empty(), "descriptors out of nowhere");
                msg
            })
        } else {
            control::recv::<T>(&mut reader)
        };
        match received {
            Ok(msg) => check_round_trip(&msg),
            Err(ControlError::TooLarge(len)) => {
                assert!(len > control::MAX_FRAME, "a frame of {len} bytes refused as too large");
                return;
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                return;
            }
        }
    }
}

fn check_round_trip<T: Serialize + DeserializeOwned>(msg: &T) {
    crate::json::assert_round_trip(msg, "control message");
    let (mut a, mut b) = UnixStream::pair().expect("a socket pair");
    control::send(&mut a, msg).expect("sending a decoded message");
    let again: T = control::recv(&mut b).expect("receiving a message just sent");
    let (before, after) = (serde_json::to_value(msg).expect("JSON"), serde_json::to_value(&again).expect("JSON"));
    assert!(crate::json::equivalent(&before, &after), "sent {before}, received {after}");
}

fn frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let json = serde_json::to_vec(msg).expect("seed messages encode");
    let mut out = u32::try_from(json.len()).expect("short").to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

fn requests() -> Vec<Request> {
    let run = Run {
        program: b"/usr/bin/python3".to_vec(),
        args: vec![b"-c".to_vec(), b"print(1)".to_vec(), vec![0xff, 0xfe]],
        env: vec![b"PATH=/usr/bin:/bin".to_vec(), b"HOME=/home/user".to_vec()],
        cwd: "/home/user".into(),
        umask: 0o022,
        place: Where::Node(2),
        options: RunOptions { stay_home: false, no_auto_migrate: true, hint: Some(Hint::CpuBound), mem_mb: Some(512) },
        rlimits: vec![Rlimit { resource: 7, soft: 1024, hard: u64::MAX }],
    };
    vec![
        Request::Run(run),
        Request::Signal { signo: 15 },
        Request::Migrate { home_pid: 1234, target: Target::Node(3) },
        Request::Migrate { home_pid: 1, target: Target::Balance },
        Request::Reattach,
        Request::Guests,
    ]
}

fn responses() -> Vec<Response> {
    vec![
        Response::Started { home_pid: 1234, node: 2 },
        Response::Exited { code: 137 },
        Response::Lost { reason: "node 2 is down".into() },
        Response::Moved { home_pid: 1234, from: 1, to: 2, seconds: 0.532, frozen: 0.25 },
        Response::Refused { why: Refusal::NotYours, message: "it belongs to alice".into() },
        Response::Guests { count: 3 },
    ]
}

/// Each message type framed alone, two frames back to back, a frame claiming more than it carries, and a
/// length over the limit.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (i, request) in requests().iter().enumerate() {
        seeds.push([&[u8::try_from(i % 2).expect("0 or 1")][..], &frame(request)].concat());
    }
    for (i, response) in responses().iter().enumerate() {
        seeds.push([&[2 | u8::try_from(i % 2).expect("0 or 1")][..], &frame(response)].concat());
    }
    let two = [frame(&Request::Guests), frame(&Request::Signal { signo: 2 })].concat();
    seeds.push([&[0][..], &two].concat());
    let mut short = frame(&Request::Reattach);
    short[0] += 10;
    seeds.push([&[0][..], &short].concat());
    seeds.push([&[1][..], &u32::MAX.to_le_bytes()[..]].concat());
    seeds
}
