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
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};
use wgmesh_core::{NodePrivateKey, NodePublicKey, PeerConfig, Status};

use crate::desired::{ChangeError, Desired, DesiredState};
use crate::driver::{DriverHandle, RequestError};

/// The errno values `wg` understands.
const EINVAL: i32 = 22;
const EIO: i32 = 5;
const EPROTO: i32 = 71;

/// Why a `set` was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetError {
    /// A line is not `key=value` or its value is malformed.
    #[error("invalid line {0:?}")]
    Invalid(String),
    /// A key wgmeshd does not know.
    #[error("unknown key {0:?}")]
    UnknownKey(String),
}

fn hex(bytes: &[u8; 32]) -> String {
    let mut out = String::with_capacity(64);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Renders the answer to `get=1` (without the final `errno` line).
pub fn render_get(desired: &Desired, status: &Status) -> String {
    let mut out = String::new();
    let wall = SystemTime::now();
    let _ = writeln!(out, "private_key={}", hex(desired.private_key.as_bytes()));
    let _ = writeln!(out, "listen_port={}", status.listen_port);
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
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| SetError::Invalid(line.clone()))?;
        let invalid = || SetError::Invalid(line.clone());
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
            (false, "fwmark") => {}
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
                if value == "true" && just_created {
                    wg.peers.pop();
                    current = None;
                    just_created = false;
                }
            }
            (true, "remove") => {
                if let (Some(i), "true") = (current, value) {
                    wg.peers.remove(i);
                    current = None;
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

/// Serves UAPI on `listener` until it fails. `get` reads the engine's
/// status and `desired`; `set` changes `desired` (which applies it).
pub async fn serve(listener: UnixListener, driver: DriverHandle, desired: Arc<DesiredState>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "UAPI accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let driver = driver.clone();
        let desired = desired.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &driver, &desired).await {
                debug!(error = %e, "UAPI connection ended with an error");
            }
        });
    }
}

async fn connection(
    stream: UnixStream,
    driver: &DriverHandle,
    desired: &DesiredState,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    // A client may send several requests on one connection.
    while let Some(first) = lines.next_line().await? {
        let mut body = Vec::new();
        while let Some(line) = lines.next_line().await? {
            if line.is_empty() {
                break;
            }
            body.push(line);
        }
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
            EINVAL
        }
        Err(ChangeError::Engine(RequestError::Refused(e))) => {
            warn!(error = %e, "UAPI set refused by the engine");
            EINVAL
        }
        Err(ChangeError::Engine(RequestError::Stopped)) => EIO,
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
