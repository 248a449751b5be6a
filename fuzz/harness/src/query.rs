//! Target `infod_query`: infod's query socket, where any local user sends JSON lines
//! (`query::Request`), and where `mosctl` reads infod's answers (`query::Response`).
//!
//! The first input byte picks the type: even, requests, read as infod's `serve` reads them (lines of at
//! most 64 KiB, UTF-8, each decoded on its own, a bad one answered with an error line); odd, one answer,
//! decoded as `query::ask` decodes it.
//!
//! Checked: decoding returns, whatever the bytes; the error answer infod makes of a refusal encodes; a
//! message accepted survives the round trip through JSON unchanged.

use rmosix_common::query::{ClusterView, Counters, NodeView, Request, Response};

/// Pieces of queries worth splicing in.
pub const TOKENS: &[&[u8]] = &[
    br#"{"cmd":"view"}"#,
    br#"{"cmd":"best","mem_bytes":1}"#,
    br#""reply":"view""#,
    br#""reply":"best""#,
    b"null",
    b"18446744073709551615",
    b"1e400",
    b"\n",
];

/// What infod reads of one connection.
const MAX_REQUESTS: usize = 64 * 1024;

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        // infod reads through `take(64 KiB)` and stops at the first line that is not UTF-8.
        let Ok(text) = std::str::from_utf8(&rest[..rest.len().min(MAX_REQUESTS)]) else { return };
        for line in text.lines() {
            match serde_json::from_str::<Request>(line) {
                Ok(request) => crate::json::assert_round_trip(&request, "query request"),
                Err(e) => {
                    let answer = Response::Error { message: format!("bad request: {e}") };
                    serde_json::to_string(&answer).expect("infod's error answer encodes");
                }
            }
        }
    } else if let Ok(response) = serde_json::from_slice::<Response>(rest) {
        crate::json::assert_round_trip(&response, "query response");
    }
}

/// Requests, good and bad, and each kind of answer.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = [
        "{\"cmd\":\"view\"}\n{\"cmd\":\"best\"}\n{\"cmd\":\"best\",\"mem_bytes\":1073741824}\n",
        "{\"cmd\":\"reboot\"}\n{\"cmd\":\"view\",\"extra\":1}\nnot json\n",
    ]
    .iter()
    .map(|t| [&[0][..], t.as_bytes()].concat())
    .collect();
    let node = NodeView {
        id: 2,
        address: "10.213.0.2".into(),
        alive: true,
        load: Some(0.75),
        cpus: Some(2),
        speed: Some(1.5),
        mem_free: Some(1 << 30),
        mem_total: Some(4 << 30),
        guests: Some(1),
        blocks_guests: Some(false),
        stays: Some(false),
        lstays: Some(false),
        age_ms: Some(120),
    };
    let unknown = NodeView {
        id: 3,
        address: "10.213.0.3".into(),
        alive: false,
        load: None,
        cpus: None,
        speed: None,
        mem_free: None,
        mem_total: None,
        guests: None,
        blocks_guests: None,
        stays: None,
        lstays: None,
        age_ms: None,
    };
    let mut counters = Counters { sent: 10, send_errors: 0, received: 9, accepted: 8, ..Counters::default() };
    counters.dropped.insert("mac".into(), 1);
    let responses = [
        Response::View(ClusterView { node: 1, nodes: vec![node, unknown], counters }),
        Response::Best { node: 2 },
        Response::Error { message: "bad request".into() },
    ];
    for response in responses {
        seeds.push([&[1][..], &serde_json::to_vec(&response).expect("seed answers encode")].concat());
    }
    seeds
}
