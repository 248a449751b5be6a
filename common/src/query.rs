//! The local query protocol between infod and the tools on the same node (`mosctl status`, `mosctl best`,
//! later migd and mtop): one JSON request line over infod's Unix socket, one JSON response line back.
//! JSON keeps it inspectable by hand (`socat - UNIX:/run/rmosix/infod.sock`) and scriptable.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Environment variable naming infod's socket; overrides the configuration (the test cluster sets it).
pub const SOCKET_ENV: &str = "RMOSIX_INFOD_SOCKET";

/// A request to infod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The whole cluster as this node sees it.
    View,
    /// The best node for a new job; infod bumps that node's load locally so that back-to-back requests spread.
    Best {
        /// Memory the job needs, in bytes; nodes with less free memory are passed over.
        #[serde(default)]
        mem_bytes: u64,
    },
}

/// infod's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    View(ClusterView),
    Best { node: u32 },
    Error { message: String },
}

/// One node as seen from the answering node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: u32,
    pub address: String,
    /// Heard of, directly or through others, within `down_after_ms`.
    pub alive: bool,
    /// Decayed run-queue length; `null` when nothing is known.
    pub load: Option<f64>,
    pub cpus: Option<u32>,
    pub speed: Option<f64>,
    pub mem_free: Option<u64>,
    pub mem_total: Option<u64>,
    pub guests: Option<u32>,
    pub blocks_guests: Option<bool>,
    /// Nothing leaves it by itself (`mosctl stay`).
    #[serde(default)]
    pub stays: Option<bool>,
    /// Its own jobs do not leave it by themselves (`mosctl lstay`).
    #[serde(default)]
    pub lstays: Option<bool>,
    /// Age of the newest information in milliseconds; `null` when never heard of.
    pub age_ms: Option<u64>,
}

/// Datagram counters of the answering infod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub sent: u64,
    pub send_errors: u64,
    pub received: u64,
    pub accepted: u64,
    /// Dropped datagrams by reason (`mac`, `replay`, `stale`, `unknown_sender`, `malformed`, ...).
    pub dropped: std::collections::BTreeMap<String, u64>,
}

/// The answer to [`Request::View`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The answering node.
    pub node: u32,
    pub nodes: Vec<NodeView>,
    pub counters: Counters,
}

/// A failed query.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot reach infod at {path}: {source} (is infod running? set --socket or ${SOCKET_ENV})")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to infod at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("infod at {path} sent an answer that is not understood: {reason}")]
    BadAnswer { path: PathBuf, reason: String },
    #[error("infod refused: {0}")]
    Refused(String),
}

/// Sends one request to the infod socket at `path` and returns its answer.
pub fn ask(path: &Path, request: &Request) -> Result<Response, QueryError> {
    let io = |source| QueryError::Io { path: path.to_owned(), source };
    let mut stream =
        UnixStream::connect(path).map_err(|source| QueryError::Connect { path: path.to_owned(), source })?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(io)?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    let response: Response = serde_json::from_str(&answer)
        .map_err(|e| QueryError::BadAnswer { path: path.to_owned(), reason: e.to_string() })?;
    if let Response::Error { message } = response {
        return Err(QueryError::Refused(message));
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_object() {
        assert_eq!(serde_json::to_string(&Request::View).unwrap(), r#"{"cmd":"view"}"#);
        let best: Request = serde_json::from_str(r#"{"cmd":"best"}"#).unwrap();
        assert_eq!(best, Request::Best { mem_bytes: 0 });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
    }
}
