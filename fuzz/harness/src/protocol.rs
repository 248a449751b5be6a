//! Target `migd_messages`: the JSON payloads of migd's frames (`rmosix_migd::protocol`), decoded by the
//! daemon after the channel has authenticated them: a node holding the cluster key can still send
//! anything.
//!
//! The first input byte picks the type: `Offer`, `Verdict`, `Attach`, `Moved`, `Go`, `Ask` (with its
//! `Change`), `RecordState`, and the bare payloads the daemon decodes (a signal or exit code `i32`, a
//! destination node `u32`, a move failure `(Refusal, String)`, a refusal's reason `String`). The rest is the payload, decoded as `recv_json` and the daemon decode it
//! (`serde_json::from_slice`).
//!
//! Checked: decoding returns, whatever the bytes; a message accepted survives the round trip through JSON
//! unchanged.

use rmosix_common::control::Refusal;
use rmosix_migd::protocol::{Ask, Attach, Go, Moved, Offer, RecordState, Verdict};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Pieces of payloads worth splicing in.
pub const TOKENS: &[&[u8]] = &[
    br#""home_node":"#,
    br#""groups":["#,
    br#""refusal":"not_yours""#,
    br#""epoch":"#,
    br#""change":{"from_node":"#,
    br#""frozen_so_far":"#,
    br#""frozen":"#,
    b"4294967295",
    b"-2147483648",
    b"1e-320",
    b"null",
    b"\\u0000",
];

/// The payload types, in the order the mode byte picks them.
const KINDS: usize = 11;

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&mode, payload)) = data.split_first() else { return };
    match usize::from(mode) % KINDS {
        0 => decode::<Offer>(payload, "offer"),
        1 => decode::<Verdict>(payload, "verdict"),
        2 => decode::<Attach>(payload, "attach"),
        3 => decode::<Moved>(payload, "moved"),
        4 => decode::<i32>(payload, "signal or exit code"),
        5 => decode::<u32>(payload, "destination node"),
        6 => decode::<(Refusal, String)>(payload, "move failure"),
        7 => decode::<Go>(payload, "go"),
        8 => decode::<Ask>(payload, "record question"),
        9 => decode::<RecordState>(payload, "record state"),
        _ => decode::<String>(payload, "refusal reason"),
    }
}

fn decode<T: Serialize + DeserializeOwned>(payload: &[u8], what: &str) {
    if let Ok(msg) = serde_json::from_slice::<T>(payload) {
        crate::json::assert_round_trip(&msg, what);
    }
}

/// One message of each type, written as JSON text rather than built from the types, so the seeds do not
/// depend on the fields of the day: a seed that no longer decodes is still a fine place to start from.
pub fn seeds() -> Vec<Vec<u8>> {
    let texts: [(u8, &str); 15] = [
        (
            0,
            r#"{"home_node":1,"home_pid":4321,"uid":1000,"gid":1000,"groups":[1000,1001],"command":["python3","-c","print(\"\u00e9\")"],"image_bytes":268435456,"epoch":3}"#,
        ),
        (1, r#"{"ok":true,"refusal":null,"message":"","pid":5678}"#),
        (1, r#"{"ok":false,"refusal":"target_blocks_guests","message":"node 2 takes no guests","pid":0}"#),
        (2, r#"{"home_pid":4321,"pid":5678,"epoch":4}"#),
        (2, r#"{"home_pid":4321,"pid":5678,"epoch":4,"frozen":0.75}"#),
        (3, r#"{"to":2,"seconds":1.25,"frozen":0.5}"#),
        (4, "-9"),
        (5, "3"),
        (6, r#"["not_migratable","it holds a TCP socket"]"#),
        (6, r#"["failed",""]"#),
        (7, r#"{"frozen_so_far":0.125}"#),
        (8, r#"{"home_pid":4321,"change":null}"#),
        (8, r#"{"home_pid":4321,"change":{"from_node":1,"from_epoch":3,"to_node":2},"lost":"both restores failed"}"#),
        (9, r#"{"ended":false,"node":2,"epoch":4,"attached":true,"changed":true}"#),
        (10, r#""the record names node 3, generation 5""#),
    ];
    texts.iter().map(|(kind, text)| [&[*kind][..], text.as_bytes()].concat()).collect()
}
