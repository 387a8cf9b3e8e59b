//! The server's Curve25519 key: generated on first start, stored as base64
//! text in a file of mode 0600, never printed (only its public key).

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use wgmesh_control::wire::PrivateKey;

/// Why the key file could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading, creating or writing failed.
    #[error("server key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file holds no base64 32-byte key.
    #[error("server key file {0} does not hold a base64 32-byte key")]
    Malformed(PathBuf),
    /// Others may read the file.
    #[error(
        "server key file {path} has mode {mode:o}; it must not be readable by group or others (chmod 600)"
    )]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// No randomness.
    #[error("OS random number generator: {0}")]
    Random(String),
}

/// Reads the key at `path`, or makes and stores a new one if there is none.
pub fn load_or_create(path: &Path) -> Result<PrivateKey, KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyFileError::TooOpen {
                    path: path.to_path_buf(),
                    mode,
                });
            }
            let bytes = BASE64
                .decode(text.trim())
                .map_err(|_| KeyFileError::Malformed(path.to_path_buf()))?;
            let bytes: [u8; 32] = bytes
                .try_into()
                .map_err(|_| KeyFileError::Malformed(path.to_path_buf()))?;
            Ok(PrivateKey::from_bytes(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
            getrandom::fill(bytes.as_mut()).map_err(|e| KeyFileError::Random(e.to_string()))?;
            let key = PrivateKey::from_bytes(*bytes);
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            // create_new: two servers starting at once never overwrite
            // each other's key; the loser fails and is restarted.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            let text = zeroize::Zeroizing::new(format!("{}\n", BASE64.encode(*key.to_bytes())));
            file.write_all(text.as_bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
            tracing::info!(path = %path.display(), public = %key.server_key(), "server key generated");
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_with_mode_0600_and_read_back() {
        let dir = std::env::temp_dir().join(format!("wgmesh-key-{}", std::process::id()));
        let path = dir.join("server.key");
        let _ = std::fs::remove_dir_all(&dir);
        let made = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let read = load_or_create(&path).unwrap();
        assert_eq!(made.public_bytes(), read.public_bytes());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(KeyFileError::TooOpen { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(KeyFileError::Malformed(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
