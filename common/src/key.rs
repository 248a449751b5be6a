//! The cluster key: the secret every node of a cluster shares, used to authenticate datagrams and
//! connections between nodes. Stored as hex in a file that only its owner may read (mode 0600); a key file
//! readable by others is refused, since anyone who can read it can forge load reports and migrations.

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Fewest secret bytes a key may have.
pub const MIN_KEY_BYTES: usize = 16;
/// Bytes in a generated key.
pub const GENERATED_KEY_BYTES: usize = 32;

/// The shared secret. Its `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(Vec<u8>);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey({} bytes)", self.0.len())
    }
}

/// A key file that can't be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read cluster key {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster key {path} is accessible by group or others (mode {mode:04o}); run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("cluster key {path} is not hex: {reason}")]
    NotHex { path: PathBuf, reason: String },
    #[error("cluster key {path} has {len} bytes; at least {MIN_KEY_BYTES} are needed")]
    TooShort { path: PathBuf, len: usize },
    #[error("cannot write cluster key {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ClusterKey {
    /// Wraps raw secret bytes (tests and simulations).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    /// The secret.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Loads the key at `path`, refusing a file others can read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let read = |source| KeyError::Read { path: path.to_owned(), source };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: path.to_owned(), mode });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let bytes = hex::decode(text.trim())
            .map_err(|e| KeyError::NotHex { path: path.to_owned(), reason: e.to_string() })?;
        if bytes.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort { path: path.to_owned(), len: bytes.len() });
        }
        Ok(Self(bytes))
    }

    /// Makes a new random key.
    pub fn generate() -> Self {
        let mut bytes = vec![0u8; GENERATED_KEY_BYTES];
        rand::fill(&mut bytes[..]);
        Self(bytes)
    }

    /// Writes the key to a new file at `path` with mode 0600; an existing file is not overwritten.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let write = |source| KeyError::Write { path: path.to_owned(), source };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(write)?;
        writeln!(file, "{}", hex::encode(&self.0)).map_err(write)?;
        file.sync_all().map_err(write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_and_others_cannot_read_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let key = ClusterKey::generate();
        key.write_new(&path).unwrap();
        assert_eq!(ClusterKey::load(&path).unwrap(), key);
        assert!(key.write_new(&path).is_err(), "an existing key must not be overwritten");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = ClusterKey::load(&path).unwrap_err();
        assert!(matches!(err, KeyError::Permissions { mode: 0o644, .. }), "{err}");
    }

    #[test]
    fn short_or_garbled_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        for (text, short) in [("abcd\n", true), ("not hex at all", false)] {
            let _ = std::fs::remove_file(&path);
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path).unwrap();
            std::fs::write(&path, text).unwrap();
            let err = ClusterKey::load(&path).unwrap_err();
            if short {
                assert!(matches!(err, KeyError::TooShort { len: 2, .. }), "{err}");
            } else {
                assert!(matches!(err, KeyError::NotHex { .. }), "{err}");
            }
        }
    }

    #[test]
    fn debug_does_not_leak_the_secret() {
        let key = ClusterKey::from_bytes(b"0123456789abcdef");
        assert_eq!(format!("{key:?}"), "ClusterKey(16 bytes)");
    }
}
