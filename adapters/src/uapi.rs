//! The WireGuard cross-platform userspace API ("UAPI") on
//! `/var/run/wireguard/<interface>.sock`, in the text format wireguard-go
//! speaks, so that the standard `wg show` and `wg set` work against wgmeshd.
//!
//! A request is `get=1` or `set=1` followed by `key=value` lines and an empty
//! line; the answer to `get` is the device and its peers as `key=value`
//! lines; every answer ends with `errno=N` and an empty line. Keys are hex.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};
use wgmesh_core::{NodePrivateKey, NodePublicKey, PeerConfig, Status};

use crate::desired::{ChangeError, Desired, DesiredState};
use crate::driver::{DriverHandle, RequestError};
use crate::localsock::{
    CallerRights, ConnectionLimit, MAX_CONNECTIONS_PER_SOCKET, REQUEST_READ_TIMEOUT, ReadLineError,
    SocketAccess, read_bounded_line, stream_rights,
};

/// The errno values `wg` understands.
const EINVAL: i32 = 22;
const EIO: i32 = 5;
const EPROTO: i32 = 71;

/// The errno `wg` reports for a setting wgmeshd does not implement
/// ("Operation not supported").
const EOPNOTSUPP: i32 = 95;
/// The errno for a caller that may not use the socket.
const EACCES: i32 = 13;

/// The longest line of a request. The longest valid one (an `endpoint=` or
/// `allowed_ip=` with an IPv6 address) is under 100 bytes.
pub const MAX_LINE_BYTES: usize = 1024;
/// The most lines in one request: 4096 peers of 16 lines each.
pub const MAX_LINES_PER_REQUEST: usize = 65_536;

/// Why a `set` was refused. The errors never carry a line's value: a key
/// line that fails to parse must not end up in the log.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetError {
    /// A line is not `key=value`.
    #[error("a line is not key=value")]
    NotKeyValue,
    /// The value of `key` is malformed.
    #[error("invalid value for {0}")]
    Invalid(String),
    /// A key wgmeshd does not know.
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    /// A setting wgmeshd knows but does not implement.
    #[error("{0}")]
    Unsupported(&'static str),
}

impl SetError {
    /// The errno `wg` is answered with.
    pub fn errno(&self) -> i32 {
        match self {
            SetError::NotKeyValue | SetError::Invalid(_) | SetError::UnknownKey(_) => EINVAL,
            SetError::Unsupported(_) => EOPNOTSUPP,
        }
    }
}

fn hex(bytes: &[u8; 32]) -> String {
    let mut out = String::with_capacity(64);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    // `from_str_radix` takes a leading sign: check the digits first.
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A decimal number without sign or spaces (`u32::from_str` takes a `+`).
fn parse_decimal(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Renders the answer to `get=1` (without the final `errno` line).
pub fn render_get(desired: &Desired, status: &Status) -> String {
    let mut out = String::new();
    let wall = SystemTime::now();
    let _ = writeln!(out, "private_key={}", hex(desired.private_key.as_bytes()));
    let _ = writeln!(out, "listen_port={}", status.listen_port);
    // wg prints the mark only when one is set, as wireguard-go sends it.
    if desired.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", desired.fwmark);
    }
    let configured: Vec<&PeerConfig> = desired
        .reconfig
        .wireguard
        .iter()
        .flat_map(|w| w.peers.iter())
        .collect();
    for peer in &status.peers {
        let config = configured.iter().find(|p| p.public_key == peer.node_key);
        let _ = writeln!(out, "public_key={}", hex(peer.node_key.as_bytes()));
        if let Some(psk) = config.and_then(|c| c.preshared_key) {
            let _ = writeln!(out, "preshared_key={}", hex(&psk));
        }
        let _ = writeln!(out, "protocol_version=1");
        let endpoint = peer
            .endpoint
            .or_else(|| config.and_then(|c| c.endpoints.first().copied()));
        if let Some(endpoint) = endpoint {
            let _ = writeln!(out, "endpoint={endpoint}");
        }
        let (sec, nsec) = peer
            .last_handshake_ago
            .and_then(|ago| wall.checked_sub(ago))
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        let _ = writeln!(out, "last_handshake_time_sec={sec}");
        let _ = writeln!(out, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(out, "tx_bytes={}", peer.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", peer.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            peer.persistent_keepalive_secs.unwrap_or(0)
        );
        for ip in &peer.allowed_ips {
            let _ = writeln!(out, "allowed_ip={ip}");
        }
    }
    out
}

/// The effect of a `set=1` on the desired state.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SetOutcome {
    /// A new private key, when it differs from the running one.
    pub new_private_key: Option<NodePrivateKey>,
}

/// Applies the `key=value` lines of a `set=1` to `desired`.
pub fn apply_set(desired: &mut Desired, lines: &[String]) -> Result<SetOutcome, SetError> {
    let mut outcome = SetOutcome::default();
    let wg = desired
        .reconfig
        .wireguard
        .get_or_insert_with(Default::default);
    // The peer that the following peer-level keys refer to (None: skipped
    // because of update_only, or removed).
    let mut current: Option<usize> = None;
    let mut in_peer = false;
    let mut just_created = false;
    for line in lines {
        let (key, value) = line.split_once('=').ok_or(SetError::NotKeyValue)?;
        let invalid = || SetError::Invalid(key.to_owned());
        match (in_peer, key) {
            (false, "private_key") => {
                let bytes = parse_hex(value).ok_or_else(invalid)?;
                let key = NodePrivateKey::from_bytes(bytes);
                if key != desired.private_key {
                    desired.private_key = key.clone();
                    outcome.new_private_key = Some(key);
                }
            }
            (false, "listen_port") => wg.listen_port = value.parse().map_err(|_| invalid())?,
            // 0 is "no mark", what every config without a FwMark sends;
            // the mark goes on the UDP socket (`DesiredState::change`).
            (false, "fwmark") => desired.fwmark = parse_decimal(value).ok_or_else(invalid)?,
            (false, "replace_peers") => {
                if value == "true" {
                    wg.peers.clear();
                }
            }
            (_, "public_key") => {
                in_peer = true;
                let key = NodePublicKey(parse_hex(value).ok_or_else(invalid)?);
                just_created = false;
                current = match wg.peers.iter().position(|p| p.public_key == key) {
                    Some(i) => Some(i),
                    None => {
                        wg.peers.push(PeerConfig::new(key, Vec::new()));
                        just_created = true;
                        Some(wg.peers.len() - 1)
                    }
                };
            }
            (true, "update_only") => {
                // update_only: a peer that `public_key` only now created must
                // not exist; take it out again and skip its keys.
                if let (Some(i), "true", true) = (current, value, just_created) {
                    wg.peers.remove(i);
                    current = None;
                    just_created = false;
                }
            }
            (true, "remove") => {
                if let (Some(i), "true") = (current, value) {
                    wg.peers.remove(i);
                    current = None;
                    // The removed peer is no longer the one a following
                    // update_only could take out again.
                    just_created = false;
                }
            }
            (true, "preshared_key") => {
                let psk = parse_hex(value).ok_or_else(invalid)?;
                if let Some(i) = current {
                    wg.peers[i].preshared_key = (psk != [0; 32]).then_some(psk);
                }
            }
            (true, "endpoint") => {
                let endpoint: SocketAddr = value.parse().map_err(|_| invalid())?;
                if let Some(i) = current {
                    wg.peers[i].endpoints = vec![endpoint];
                }
            }
            (true, "persistent_keepalive_interval") => {
                let secs: u16 = value.parse().map_err(|_| invalid())?;
                if let Some(i) = current {
                    wg.peers[i].persistent_keepalive_secs = (secs != 0).then_some(secs);
                }
            }
            (true, "replace_allowed_ips") => {
                if let (Some(i), "true") = (current, value) {
                    wg.peers[i].allowed_ips.clear();
                }
            }
            (true, "allowed_ip") => {
                let net: IpNet = value.parse().map_err(|_| invalid())?;
                if let Some(i) = current {
                    if !wg.peers[i].allowed_ips.contains(&net) {
                        wg.peers[i].allowed_ips.push(net);
                    }
                }
            }
            (true, "protocol_version") => {
                if value != "1" {
                    return Err(invalid());
                }
            }
            _ => return Err(SetError::UnknownKey(key.to_owned())),
        }
    }
    Ok(outcome)
}

/// Serves UAPI on `listener` until the task is aborted. `get` reads the
/// engine's status and `desired`; `set` changes `desired` (which applies
/// it). Only root and the daemon's own user may use it (`get` shows the
/// private key, `set` changes everything); at most
/// [`MAX_CONNECTIONS_PER_SOCKET`] connections at once.
pub async fn serve(listener: UnixListener, driver: DriverHandle, desired: Arc<DesiredState>) {
    let limit = ConnectionLimit::new(MAX_CONNECTIONS_PER_SOCKET);
    let mut failures = 0u32;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failures = 0;
                stream
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                warn!(error = %e, failures, "UAPI accept failed");
                tokio::time::sleep(accept_backoff(failures)).await;
                continue;
            }
        };
        let Some(permit) = limit.try_admit() else {
            debug!("UAPI connection refused: too many open");
            continue;
        };
        let driver = driver.clone();
        let desired = desired.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(stream, &driver, &desired).await {
                debug!(error = %e, "UAPI connection ended with an error");
            }
        });
    }
}

/// The wait after the `failures`-th accept error in a row: 10 ms doubling up
/// to one second, so a descriptor shortage neither spins nor ends the socket.
pub fn accept_backoff(failures: u32) -> std::time::Duration {
    let ms = 10u64.saturating_mul(1 << failures.clamp(1, 7).saturating_sub(1));
    std::time::Duration::from_millis(ms.min(1000))
}

/// One request as read from the socket.
enum Request {
    /// The first line and the body.
    Lines(String, Vec<String>),
    /// Too long, too many lines, not UTF-8 or too slow: answered with an
    /// errno, then the connection is closed.
    Refused(&'static str),
}

async fn read_request<R>(reader: &mut R) -> std::io::Result<Option<Request>>
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    // A connection idle between requests for that long is closed quietly.
    let first = match tokio::time::timeout(
        REQUEST_READ_TIMEOUT,
        read_bounded_line(reader, MAX_LINE_BYTES),
    )
    .await
    {
        Err(_) | Ok(Ok(None)) => return Ok(None),
        Ok(Ok(Some(first))) => first,
        Ok(Err(ReadLineError::Io(e))) => return Err(e),
        Ok(Err(ReadLineError::TooLong(_))) => {
            return Ok(Some(Request::Refused("line too long")));
        }
        Ok(Err(ReadLineError::NotUtf8)) => return Ok(Some(Request::Refused("not UTF-8"))),
    };
    // Once a request has begun, all of it must arrive in time.
    let read = async {
        let mut body = Vec::new();
        loop {
            match read_bounded_line(reader, MAX_LINE_BYTES).await {
                Ok(Some(line)) if line.is_empty() => break,
                Ok(Some(line)) => {
                    if body.len() == MAX_LINES_PER_REQUEST {
                        return Ok(Some(Request::Refused("too many lines")));
                    }
                    body.push(line);
                }
                Ok(None) => break,
                Err(ReadLineError::Io(e)) => return Err(e),
                Err(ReadLineError::TooLong(_)) => {
                    return Ok(Some(Request::Refused("line too long")));
                }
                Err(ReadLineError::NotUtf8) => return Ok(Some(Request::Refused("not UTF-8"))),
            }
        }
        Ok(Some(Request::Lines(first, body)))
    };
    match tokio::time::timeout(REQUEST_READ_TIMEOUT, read).await {
        Ok(result) => result,
        Err(_) => Ok(Some(Request::Refused("request not complete in time"))),
    }
}

async fn connection(
    stream: UnixStream,
    driver: &DriverHandle,
    desired: &DesiredState,
) -> std::io::Result<()> {
    let rights = stream_rights(&stream, SocketAccess::default());
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    // A client may send several requests on one connection.
    while let Some(request) = read_request(&mut reader).await? {
        let (first, body) = match request {
            // The request is read (bounded) before the refusal, so that the
            // answer is not lost to a reset for unread data.
            Request::Lines(..) if rights != CallerRights::Admin => {
                info!("UAPI caller refused: only root may use the UAPI socket");
                write
                    .write_all(format!("errno={EACCES}\n\n").as_bytes())
                    .await?;
                return write.shutdown().await;
            }
            Request::Lines(first, body) => (first, body),
            Request::Refused(why) => {
                warn!(reason = why, "UAPI request refused");
                write
                    .write_all(format!("errno={EINVAL}\n\n").as_bytes())
                    .await?;
                return write.shutdown().await;
            }
        };
        let answer = match first.as_str() {
            "get=1" => match driver.status().await {
                Ok(status) => {
                    let d = desired.snapshot().await;
                    format!("{}errno=0\n\n", render_get(&d, &status))
                }
                Err(_) => format!("errno={EIO}\n\n"),
            },
            "set=1" => format!("errno={}\n\n", set(desired, &body).await),
            _ => format!("errno={EPROTO}\n\n"),
        };
        write.write_all(answer.as_bytes()).await?;
    }
    Ok(())
}

/// Runs a `set=1`; returns the errno. A new private key replaces the
/// engine ([`DesiredState::change`]).
async fn set(desired: &DesiredState, body: &[String]) -> i32 {
    match desired.change(|d| apply_set(d, body).map(drop)).await {
        Ok(_) => 0,
        Err(ChangeError::Edit(e)) => {
            warn!(error = %e, "UAPI set refused");
            e.errno()
        }
        Err(ChangeError::Engine(RequestError::Refused(e))) => {
            warn!(error = %e, "UAPI set refused by the engine");
            EINVAL
        }
        Err(ChangeError::Engine(RequestError::Stopped)) => EIO,
        Err(ChangeError::Fwmark(e)) => {
            warn!(error = %e, "UAPI set refused: the socket did not take the firewall mark");
            e.raw_os_error().unwrap_or(EIO)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::empty_reconfig;

    fn desired() -> Desired {
        Desired {
            private_key: NodePrivateKey::from_bytes([1; 32]),
            reconfig: empty_reconfig(51820),
            fwmark: 0,
        }
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn set_adds_updates_and_removes_peers() {
        let mut d = desired();
        let peer = NodePrivateKey::from_bytes([2; 32]).public_key();
        let body = format!(
            "listen_port=4000\npublic_key={}\nendpoint=10.0.0.2:51820\npersistent_keepalive_interval=25\nallowed_ip=100.64.0.2/32\nallowed_ip=10.9.0.0/24\n",
            hex(peer.as_bytes())
        );
        let outcome = apply_set(&mut d, &lines(&body)).unwrap();
        assert_eq!(outcome, SetOutcome::default());
        let wg = d.reconfig.wireguard.as_ref().unwrap();
        assert_eq!(wg.listen_port, 4000);
        assert_eq!(wg.peers.len(), 1);
        assert_eq!(
            wg.peers[0].endpoints,
            vec!["10.0.0.2:51820".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(wg.peers[0].persistent_keepalive_secs, Some(25));
        assert_eq!(wg.peers[0].allowed_ips.len(), 2);

        let body = format!(
            "public_key={}\nreplace_allowed_ips=true\nallowed_ip=100.64.0.3/32\n",
            hex(peer.as_bytes())
        );
        apply_set(&mut d, &lines(&body)).unwrap();
        let wg = d.reconfig.wireguard.as_ref().unwrap();
        assert_eq!(
            wg.peers[0].allowed_ips,
            vec!["100.64.0.3/32".parse::<IpNet>().unwrap()]
        );

        let body = format!("public_key={}\nremove=true\n", hex(peer.as_bytes()));
        apply_set(&mut d, &lines(&body)).unwrap();
        assert!(d.reconfig.wireguard.as_ref().unwrap().peers.is_empty());

        let new_key = [9u8; 32];
        let outcome = apply_set(&mut d, &lines(&format!("private_key={}", hex(&new_key)))).unwrap();
        assert_eq!(
            outcome.new_private_key,
            Some(NodePrivateKey::from_bytes(new_key))
        );

        assert_eq!(
            apply_set(&mut d, &lines("bogus=1")),
            Err(SetError::UnknownKey("bogus".into()))
        );
        assert!(matches!(
            apply_set(&mut d, &lines("listen_port=x")),
            Err(SetError::Invalid(_))
        ));
    }

    #[test]
    fn update_only_after_a_remove_leaves_other_peers_alone() {
        let mut d = desired();
        let (a, b, c) = (
            NodePrivateKey::from_bytes([2; 32]).public_key(),
            NodePrivateKey::from_bytes([3; 32]).public_key(),
            NodePrivateKey::from_bytes([4; 32]).public_key(),
        );
        let body = format!(
            "public_key={}\npublic_key={}\n",
            hex(a.as_bytes()),
            hex(b.as_bytes())
        );
        apply_set(&mut d, &lines(&body)).unwrap();
        // c is created, removed, then (update_only) must not take out b.
        let body = format!(
            "public_key={}\nremove=true\nupdate_only=true\n",
            hex(c.as_bytes())
        );
        apply_set(&mut d, &lines(&body)).unwrap();
        let keys: Vec<NodePublicKey> = d
            .reconfig
            .wireguard
            .as_ref()
            .unwrap()
            .peers
            .iter()
            .map(|p| p.public_key)
            .collect();
        assert_eq!(keys, vec![a, b]);
        // update_only on an unknown peer still creates nothing.
        let body = format!("public_key={}\nupdate_only=true\n", hex(c.as_bytes()));
        apply_set(&mut d, &lines(&body)).unwrap();
        assert_eq!(d.reconfig.wireguard.as_ref().unwrap().peers.len(), 2);
    }

    #[test]
    fn hex_with_a_sign_is_refused() {
        let good = hex(&[0xab; 32]);
        assert_eq!(parse_hex(&good), Some([0xab; 32]));
        let signed = format!("+a{}", &good[2..]);
        assert_eq!(parse_hex(&signed), None);
        let mut d = desired();
        assert_eq!(
            apply_set(&mut d, &lines(&format!("private_key={signed}"))),
            Err(SetError::Invalid("private_key".into()))
        );
    }

    #[test]
    fn a_bad_key_line_is_reported_without_its_value() {
        let mut d = desired();
        let secret = format!("{}zz", hex(&[0x5e; 32])[..62].to_owned());
        for key in ["private_key", "preshared_key"] {
            let body = if key == "private_key" {
                format!("{key}={secret}")
            } else {
                format!("public_key={}\n{key}={secret}", hex(&[2; 32]))
            };
            let err = apply_set(&mut d, &lines(&body)).unwrap_err();
            let text = format!("{err} {err:?}");
            assert!(text.contains(key), "{text}");
            assert!(!text.contains(&secret[..16]), "the value leaked: {text}");
        }
        let err = apply_set(&mut d, &lines(&secret)).unwrap_err();
        assert!(!format!("{err} {err:?}").contains(&secret[..16]));
    }

    #[test]
    fn fwmark_is_recorded_and_shown_by_get() {
        let mut d = desired();
        apply_set(&mut d, &lines("fwmark=51820")).unwrap();
        assert_eq!(d.fwmark, 51820);
        let status = Status::default();
        assert!(render_get(&d, &status).contains("\nfwmark=51820\n"));
        apply_set(&mut d, &lines("fwmark=0")).unwrap();
        assert_eq!(d.fwmark, 0);
        assert!(!render_get(&d, &status).contains("fwmark"));
        for bad in ["fwmark=x", "fwmark=+1", "fwmark=4294967296", "fwmark="] {
            assert_eq!(
                apply_set(&mut d, &lines(bad)).unwrap_err().errno(),
                EINVAL,
                "{bad}"
            );
        }
    }

    #[test]
    fn the_desired_state_debug_output_has_no_keys() {
        let mut d = desired();
        let mut peer = PeerConfig::new(NodePrivateKey::from_bytes([2; 32]).public_key(), vec![]);
        peer.preshared_key = Some([0x5e; 32]);
        d.reconfig.wireguard.as_mut().unwrap().peers.push(peer);
        let text = format!("{d:?}");
        assert!(text.contains("preshared_key"), "{text}");
        assert!(
            !text.contains("94"),
            "the pre-shared key's bytes leaked: {text}"
        );
        assert!(!text.contains(&hex(&[1; 32])), "{text}");
    }

    #[test]
    fn dropped_keys_are_zeroed() {
        let mut key = std::mem::ManuallyDrop::new(NodePrivateKey::from_bytes([0x5e; 32]));
        // SAFETY: the value is dropped once and never used as a whole again;
        // only its plain-byte key is read back, from memory the ManuallyDrop
        // still owns.
        let secret = unsafe {
            std::mem::ManuallyDrop::drop(&mut key);
            std::ptr::addr_of!(*key).cast::<[u8; 32]>().read()
        };
        assert_eq!(secret, [0; 32]);
        // The desired state's drop wipes its peers' preshared keys with this.
        let mut d = desired();
        let mut peer = PeerConfig::new(NodePrivateKey::from_bytes([2; 32]).public_key(), vec![]);
        peer.preshared_key = Some([0x5e; 32]);
        d.reconfig.wireguard.as_mut().unwrap().peers.push(peer);
        crate::desired::wipe_preshared_keys(&mut d.reconfig);
        assert_eq!(
            d.reconfig.wireguard.as_ref().unwrap().peers[0].preshared_key,
            Some([0; 32])
        );
    }

    #[test]
    fn get_lists_device_and_peers() {
        let mut d = desired();
        let peer_key = NodePrivateKey::from_bytes([2; 32]).public_key();
        let status = Status {
            listen_port: 51820,
            peers: vec![wgmesh_core::PeerStatus {
                node_key: peer_key,
                allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
                endpoint: Some("10.0.0.2:51820".parse().unwrap()),
                last_handshake_ago: Some(std::time::Duration::from_secs(3)),
                rx_bytes: 10,
                tx_bytes: 20,
                ..Default::default()
            }],
            ..Status::default()
        };
        d.reconfig
            .wireguard
            .as_mut()
            .unwrap()
            .peers
            .push(PeerConfig::new(peer_key, vec![]));
        let text = render_get(&d, &status);
        assert!(
            text.starts_with(&format!(
                "private_key={}\nlisten_port=51820\n",
                hex(&[1; 32])
            )),
            "{text}"
        );
        assert!(text.contains(&format!("public_key={}\n", hex(peer_key.as_bytes()))));
        assert!(text.contains("endpoint=10.0.0.2:51820\n"));
        assert!(
            text.contains("rx_bytes=10\ntx_bytes=20\n")
                || text.contains("tx_bytes=20\nrx_bytes=10\n")
        );
        assert!(text.contains("allowed_ip=100.64.0.2/32\n"));
        let sec: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("last_handshake_time_sec="))
            .unwrap()
            .parse()
            .unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now - sec >= 2 && now - sec <= 5, "{sec} vs {now}");
    }
}
