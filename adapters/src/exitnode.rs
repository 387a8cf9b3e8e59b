//! The exit-node side: while this node advertises a default route
//! (`0.0.0.0/0` or `::/0` in its advertised routes), the kernel forwards
//! what peers send through the tunnel to the rest of the network, and
//! nftables masquerades it behind this node's own address, as Tailscale
//! does on Linux. Stopping (or shutting down) deletes the nftables table and
//! puts the forwarding switches back as they were.
//!
//! The table is `inet wgmesh-<interface>`, one per tunnel, so it never
//! touches rules of other software and one `nft delete table` removes all
//! of it.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

/// Whether `reconfig` sends a default route through the tunnel (an exit
/// node in use): the tunnel's socket must then carry
/// [`crate::router::BYPASS_FWMARK`] so its own datagrams skip that route.
pub fn routes_through_exit_node(reconfig: &wgmesh_core::Reconfig) -> bool {
    reconfig
        .router
        .as_ref()
        .is_some_and(|r| r.routes.iter().any(|route| route.prefix_len() == 0))
}

/// The socket mark `reconfig` needs, given the mark in place now: the
/// bypass mark while an exit node is in use (unless another mark was set
/// through UAPI, which is kept), none once it is no longer used (unless the
/// mark is another one).
pub fn socket_mark_for(reconfig: &wgmesh_core::Reconfig, current: u32) -> u32 {
    use crate::router::BYPASS_FWMARK;
    match (routes_through_exit_node(reconfig), current) {
        (true, 0) => BYPASS_FWMARK,
        (false, BYPASS_FWMARK) => 0,
        (_, other) => other,
    }
}

/// The forwarding switches, as `/proc/sys` paths.
const FORWARDING_SWITCHES: [&str; 2] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];

/// Why switching the exit node on or off failed.
#[derive(Debug, thiserror::Error)]
pub enum ExitNodeError {
    /// A forwarding switch could not be read or written.
    #[error("{path}: {source}")]
    Forwarding {
        /// The switch.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The interface name has characters the nftables script cannot quote.
    #[error(
        "interface name {0:?}: only letters, digits, '.', '-' and '_' can go into an nftables rule"
    )]
    InterfaceName(String),
    /// `nft` could not be run.
    #[error("nft could not be run (is the nftables package installed?): {0}")]
    NftSpawn(#[source] std::io::Error),
    /// `nft` refused the rules.
    #[error("nft {action}: {message}")]
    Nft {
        /// What was being done.
        action: &'static str,
        /// Its stderr.
        message: String,
    },
}

/// What the exit-node side changed, for the state file: enough to undo it
/// after a crash.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitNodeApplied {
    /// The nftables table exists.
    pub table: bool,
    /// Each forwarding switch's value before this node set it, by path.
    pub saved_forwarding: Vec<(String, String)>,
}

/// Switches forwarding and masquerade for one tunnel interface.
#[derive(Debug)]
pub struct ExitNodeServer {
    interface: String,
    applied: ExitNodeApplied,
}

/// The nftables table name of `interface`.
pub fn table_name(interface: &str) -> String {
    format!("wgmesh-{interface}")
}

/// The ruleset: what comes in through the tunnel and leaves through
/// another interface is masqueraded behind that interface's address.
pub fn ruleset(interface: &str) -> String {
    let table = table_name(interface);
    format!(
        "table inet {table} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tiifname \"{interface}\" oifname != \"{interface}\" masquerade\n\
         \t}}\n\
         }}\n"
    )
}

async fn nft(action: &'static str, script: &str) -> Result<(), ExitNodeError> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(ExitNodeError::NftSpawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(ExitNodeError::NftSpawn)?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(ExitNodeError::NftSpawn)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ExitNodeError::Nft {
            action,
            message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn read_switch(path: &Path) -> Result<String, ExitNodeError> {
    std::fs::read_to_string(path)
        .map(|v| v.trim().to_owned())
        .map_err(|source| ExitNodeError::Forwarding {
            path: path.to_owned(),
            source,
        })
}

fn write_switch(path: &Path, value: &str) -> Result<(), ExitNodeError> {
    std::fs::write(path, format!("{value}\n")).map_err(|source| ExitNodeError::Forwarding {
        path: path.to_owned(),
        source,
    })
}

impl ExitNodeServer {
    /// Off, for `interface`.
    pub fn new(interface: &str) -> Self {
        Self {
            interface: interface.to_owned(),
            applied: ExitNodeApplied::default(),
        }
    }

    /// What is currently applied.
    pub fn applied(&self) -> &ExitNodeApplied {
        &self.applied
    }

    /// Whether the node is acting as an exit node.
    pub fn is_on(&self) -> bool {
        self.applied.table
    }

    /// Switches forwarding and masquerade on or off; does nothing when
    /// already so.
    pub async fn set(&mut self, on: bool) -> Result<(), ExitNodeError> {
        if on == self.applied.table {
            return Ok(());
        }
        if on {
            self.start().await
        } else {
            self.stop().await
        }
    }

    async fn start(&mut self) -> Result<(), ExitNodeError> {
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
        if !self.interface.chars().all(plain) {
            return Err(ExitNodeError::InterfaceName(self.interface.clone()));
        }
        // A table left by a crashed run is replaced, not added to.
        let table = table_name(&self.interface);
        let script = format!(
            "add table inet {table}\ndelete table inet {table}\n{}",
            ruleset(&self.interface)
        );
        nft("add masquerade", &script).await?;
        self.applied.table = true;
        for path in FORWARDING_SWITCHES {
            let path = Path::new(path);
            let before = read_switch(path)?;
            if before != "1" {
                write_switch(path, "1")?;
                self.applied
                    .saved_forwarding
                    .push((path.display().to_string(), before));
            }
        }
        info!(interface = %self.interface, %table, "exit node on: forwarding and masquerade");
        Ok(())
    }

    /// Undoes everything, also what a crashed run recorded.
    pub async fn stop(&mut self) -> Result<(), ExitNodeError> {
        let mut first_error = None;
        for (path, value) in std::mem::take(&mut self.applied.saved_forwarding) {
            if let Err(e) = write_switch(Path::new(&path), &value) {
                warn!(error = %e, "could not restore a forwarding switch");
                first_error.get_or_insert(e);
            }
        }
        if self.applied.table {
            let table = table_name(&self.interface);
            // `add` first makes the delete succeed whether or not it exists.
            let script = format!("add table inet {table}\ndelete table inet {table}\n");
            match nft("delete masquerade", &script).await {
                Ok(()) => {
                    self.applied.table = false;
                    info!(interface = %self.interface, %table, "exit node off");
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Takes over what a crashed run applied, so that [`ExitNodeServer::stop`]
    /// undoes it.
    pub fn adopt(&mut self, previous: &ExitNodeApplied) {
        self.applied.table |= previous.table;
        self.applied
            .saved_forwarding
            .extend(previous.saved_forwarding.iter().cloned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::BYPASS_FWMARK;

    #[test]
    fn the_socket_is_marked_while_a_default_route_goes_through_the_tunnel() {
        let mut reconfig = crate::desired::empty_reconfig(0);
        reconfig.router = Some(wgmesh_core::RouterConfig {
            routes: vec!["100.64.0.2/32".parse().unwrap()],
            ..Default::default()
        });
        assert!(!routes_through_exit_node(&reconfig));
        assert_eq!(socket_mark_for(&reconfig, 0), 0);
        assert_eq!(socket_mark_for(&reconfig, BYPASS_FWMARK), 0);
        assert_eq!(socket_mark_for(&reconfig, 7), 7, "a UAPI mark is kept");
        if let Some(router) = reconfig.router.as_mut() {
            router.routes.push("0.0.0.0/0".parse().unwrap());
        }
        assert!(routes_through_exit_node(&reconfig));
        assert_eq!(socket_mark_for(&reconfig, 0), BYPASS_FWMARK);
        assert_eq!(socket_mark_for(&reconfig, 7), 7);
    }

    #[test]
    fn the_ruleset_masquerades_only_what_comes_from_the_tunnel() {
        assert_eq!(
            ruleset("wg0"),
            "table inet wgmesh-wg0 {\n\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tiifname \"wg0\" oifname != \"wg0\" masquerade\n\t}\n}\n"
        );
    }
}
