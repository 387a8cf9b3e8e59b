//! The `[control]` section of the daemon's config, the matching flags, and
//! the node key kept in the state directory.
//!
//! ```toml
//! [control]
//! url = "http://192.0.2.10:8080"          # or a list: replicas, tried in turn
//! server_public_key = "base64..."         # pinned: `wgmesh-control` prints it
//! auth_key_file = "/etc/wgmesh/authkey"   # or auth_key = "..." (first start only)
//! state_dir = "/var/lib/wgmesh"           # the node key lives here, mode 0600
//! # hostname = "laptop"                   # default: the system's host name
//! ```
//!
//! With `[control]` the node's key, addresses and peers come from the
//! coordination server: `[[peer]]`, `interface.addresses`,
//! `interface.private_key` and `interface.private_key_file` are refused
//! with a clear error, so a file never mixes the two sources of peers.

use std::path::{Path, PathBuf};

use hyper::Uri;
use rand_core::OsRng;
use serde::{Deserialize, Deserializer};
use toml::Spanned;
use wgmesh_control::keys::ServerKey;
use wgmesh_core::NodePrivateKey;

/// Where the node key is kept when `state_dir` is not given.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/wgmesh";
/// The node key's file name inside the state directory.
pub const NODE_KEY_FILE: &str = "node.key";

/// `[control]` as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    /// The server's URL, or a list of replicas' URLs.
    pub url: Spanned<OneOrMany>,
    /// The server's public key (base64), pinned.
    pub server_public_key: Spanned<String>,
    /// The pre-auth key, inline.
    pub auth_key: Option<Spanned<String>>,
    /// A file holding the pre-auth key.
    pub auth_key_file: Option<Spanned<PathBuf>>,
    /// Where the node key is stored.
    pub state_dir: Option<Spanned<PathBuf>>,
    /// The host name to register with.
    pub hostname: Option<Spanned<String>>,
}

/// A string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            One(String),
            Many(Vec<String>),
        }
        match Either::deserialize(d)? {
            Either::One(s) => Ok(OneOrMany(vec![s])),
            Either::Many(v) => Ok(OneOrMany(v)),
        }
    }
}

/// A control server's base URL: plain HTTP to a host and port (put TLS in
/// front with a proxy on the server side if the path is not trusted; the
/// requests are sealed to the pinned key either way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlUrl {
    /// `host:port` to connect to.
    pub authority: String,
    /// The path prefix before `/v1/...` (empty or starting with `/`, no
    /// trailing slash).
    pub base_path: String,
    /// The URL as given, for logs and status.
    pub text: String,
}

impl ControlUrl {
    /// Parses `http://host[:port][/prefix]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: Uri = text
            .parse()
            .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "{text:?}: https is not supported by wgmeshd's client; use http:// \
                     (requests and answers are sealed to the pinned server key)"
                ));
            }
            _ => return Err(format!("{text:?}: the URL must start with http://")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{text:?}: no host"))?;
        if uri.query().is_some() {
            return Err(format!("{text:?}: a control URL takes no query"));
        }
        let port = authority.port_u16().unwrap_or(80);
        Ok(Self {
            authority: format!("{}:{port}", authority.host()),
            base_path: uri.path().trim_end_matches('/').to_owned(),
            text: text.to_owned(),
        })
    }

    /// The full URI of `path` (`/v1/map`) on this server.
    pub fn uri(&self, path: &str) -> String {
        format!("http://{}{}{path}", self.authority, self.base_path)
    }
}

/// The checked control settings the client runs with.
#[derive(Clone)]
pub struct ControlSettings {
    /// The servers, tried in order.
    pub urls: Vec<ControlUrl>,
    /// The pinned server key.
    pub server_key: ServerKey,
    /// The pre-auth key, if given (needed only to register).
    pub auth_key: Option<String>,
    /// Where the node key lives.
    pub state_dir: PathBuf,
    /// The host name to register with.
    pub hostname: String,
}

impl std::fmt::Debug for ControlSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The auth key is a secret: never printed.
        f.debug_struct("ControlSettings")
            .field("urls", &self.urls)
            .field("server_key", &self.server_key)
            .field("auth_key", &self.auth_key.as_ref().map(|_| "<redacted>"))
            .field("state_dir", &self.state_dir)
            .field("hostname", &self.hostname)
            .finish()
    }
}

/// The part of a refusal that points into the file: the byte span (if
/// any) and the message.
pub type Refusal = (Option<std::ops::Range<usize>>, String);

/// Parses a server key from base64.
pub fn parse_server_key(text: &str) -> Result<ServerKey, String> {
    let key: wgmesh_core::NodePublicKey = text
        .trim()
        .parse()
        .map_err(|e| format!("server_public_key: {e}"))?;
    Ok(ServerKey(key.0))
}

impl ControlSection {
    /// Checks the section and resolves it (reads the auth-key file).
    pub fn resolve(&self) -> Result<ControlSettings, Refusal> {
        let urls_span = Some(self.url.span());
        if self.url.get_ref().0.is_empty() {
            return Err((urls_span, "control.url: empty list".into()));
        }
        let urls = self
            .url
            .get_ref()
            .0
            .iter()
            .map(|u| ControlUrl::parse(u))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| (urls_span.clone(), format!("control.url: {e}")))?;
        let server_key = parse_server_key(self.server_public_key.get_ref())
            .map_err(|e| (Some(self.server_public_key.span()), format!("control.{e}")))?;
        let auth_key = match (&self.auth_key, &self.auth_key_file) {
            (Some(_), Some(f)) => {
                return Err((
                    Some(f.span()),
                    "control.auth_key_file: give auth_key or auth_key_file, not both".into(),
                ));
            }
            (Some(k), None) => Some(k.get_ref().trim().to_owned()),
            (None, Some(f)) => {
                let text = crate::config::read_secret_file(f.get_ref()).map_err(|e| {
                    (
                        Some(f.span()),
                        format!("control.auth_key_file: {}: {e}", f.get_ref().display()),
                    )
                })?;
                Some(text.trim().to_owned())
            }
            (None, None) => None,
        };
        if auth_key.as_deref() == Some("") {
            return Err((None, "control.auth_key: empty".into()));
        }
        let hostname = match &self.hostname {
            Some(h) if crate::magicdns::is_valid_label(h.get_ref()) => h.get_ref().clone(),
            Some(h) => {
                return Err((
                    Some(h.span()),
                    format!(
                        "control.hostname: {:?} is not a single valid DNS label",
                        h.get_ref()
                    ),
                ));
            }
            None => crate::magicdns::system_hostname(),
        };
        Ok(ControlSettings {
            urls,
            server_key,
            auth_key,
            state_dir: self
                .state_dir
                .as_ref()
                .map(|d| d.get_ref().clone())
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            hostname: if hostname.is_empty() {
                "node".into()
            } else {
                hostname
            },
        })
    }
}

/// Why the node key could not be loaded or stored.
#[derive(Debug, thiserror::Error)]
pub enum NodeKeyError {
    /// The file exists but cannot be used.
    #[error("{path}: {problem}")]
    Unusable {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The key could not be written.
    #[error("{path}: cannot store the node key: {source}")]
    Write {
        /// The key file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The node key in `state_dir`, if one was stored (a private file is
/// required, as for `private_key_file`).
pub fn load_node_key(state_dir: &Path) -> Result<Option<NodePrivateKey>, NodeKeyError> {
    let path = state_dir.join(NODE_KEY_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let unusable = |problem: String| NodeKeyError::Unusable {
        path: path.clone(),
        problem,
    };
    let text = crate::config::read_secret_file(&path).map_err(unusable)?;
    text.trim()
        .parse::<NodePrivateKey>()
        .map(Some)
        .map_err(|e| unusable(e.to_string()))
}

/// The stored node key, or a new one written to `state_dir` (created 0700;
/// the file 0600, written whole under a temporary name and renamed, so a
/// crash never leaves half a key).
pub fn load_or_create_node_key(state_dir: &Path) -> Result<NodePrivateKey, NodeKeyError> {
    if let Some(key) = load_node_key(state_dir)? {
        return Ok(key);
    }
    let path = state_dir.join(NODE_KEY_FILE);
    let write = |source| NodeKeyError::Write {
        path: path.clone(),
        source,
    };
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(write)?;
    let key = NodePrivateKey::generate(&mut OsRng);
    let temp = state_dir.join(format!("{NODE_KEY_FILE}.tmp"));
    let _ = std::fs::remove_file(&temp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(write)?;
    let text = zeroize::Zeroizing::new(format!("{}\n", key.to_base64()));
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(write)?;
    file.sync_all().map_err(write)?;
    std::fs::rename(&temp, &path).map_err(write)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_plain_http_with_a_port() {
        let u = ControlUrl::parse("http://10.0.0.1:8080").unwrap();
        assert_eq!(u.authority, "10.0.0.1:8080");
        assert_eq!(u.uri("/v1/map"), "http://10.0.0.1:8080/v1/map");
        let u = ControlUrl::parse("http://control.example/prefix/").unwrap();
        assert_eq!(u.uri("/v1/map"), "http://control.example:80/prefix/v1/map");
        let u = ControlUrl::parse("http://[fd00::1]:9000").unwrap();
        assert_eq!(u.authority, "[fd00::1]:9000");
        assert!(
            ControlUrl::parse("https://x")
                .unwrap_err()
                .contains("https")
        );
        assert!(ControlUrl::parse("ftp://x").is_err());
        assert!(ControlUrl::parse("http://x/?a=1").is_err());
    }

    #[test]
    fn the_node_key_is_created_once_private_and_then_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert!(load_node_key(&state).unwrap().is_none());
        let first = load_or_create_node_key(&state).unwrap();
        let mode = std::fs::metadata(state.join(NODE_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_or_create_node_key(&state).unwrap();
        assert_eq!(first, again);
        // A key file others can read is refused, not used.
        std::fs::set_permissions(
            state.join(NODE_KEY_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(matches!(
            load_node_key(&state),
            Err(NodeKeyError::Unusable { .. })
        ));
    }
}
