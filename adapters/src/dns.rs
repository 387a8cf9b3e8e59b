//! The DNS manager: points the system's resolver at the tailnet's DNS.
//!
//! Three ways, chosen by [`DnsMode`]:
//! - **resolv-conf**: rewrite `/etc/resolv.conf` in place (not by rename, so
//!   bind-mounted files in containers and network namespaces work). The
//!   original is saved first in a backup file; it is put back when the DNS
//!   config becomes empty, on shutdown, and on the next start after a crash.
//! - **resolved**: hand the servers and domains to systemd-resolved for the
//!   tunnel interface with `resolvectl`.
//! - **off**: do nothing.
//!
//! `auto` picks resolved when `/etc/resolv.conf` is managed by
//! systemd-resolved and `resolvectl` is installed, the file otherwise.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tracing::{info, warn};
use wgmesh_core::DnsConfig;

use crate::config::DnsMode;

/// The first line of a backup; says whether the original was a symlink.
const BACKUP_HEADER_FILE: &str = "# wgmesh backup: file\n";
const BACKUP_HEADER_LINK: &str = "# wgmesh backup: symlink ";

/// Why a DNS operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `resolvectl` failed.
    #[error("resolvectl {args}: {message}")]
    Resolvectl {
        /// Its arguments.
        args: String,
        /// Its stderr or the spawn error.
        message: String,
    },
}

fn file_err(path: &Path) -> impl FnOnce(io::Error) -> DnsError + '_ {
    move |source| DnsError::File {
        path: path.to_owned(),
        source,
    }
}

/// The resolved way of doing DNS, decided once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsBackend {
    /// Rewrite the file.
    File,
    /// systemd-resolved.
    Resolved,
    /// Nothing.
    Off,
}

/// Decides what `auto` means on this system.
pub fn detect(mode: DnsMode, resolv_conf: &Path) -> DnsBackend {
    match mode {
        DnsMode::Off => DnsBackend::Off,
        DnsMode::ResolvConf => DnsBackend::File,
        DnsMode::Resolved => DnsBackend::Resolved,
        DnsMode::Auto => {
            let linked = fs::read_link(resolv_conf)
                .map(|t| t.to_string_lossy().contains("systemd/resolve"))
                .unwrap_or(false);
            let stub = fs::read_to_string(resolv_conf)
                .map(|t| t.lines().any(|l| l.trim() == "nameserver 127.0.0.53"))
                .unwrap_or(false);
            let have_tool = std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("resolvectl").is_file()));
            if (linked || stub) && have_tool {
                DnsBackend::Resolved
            } else {
                DnsBackend::File
            }
        }
    }
}

/// Manages DNS for one interface.
#[derive(Debug)]
pub struct DnsManager {
    backend: DnsBackend,
    interface: String,
    resolv_conf: PathBuf,
    backup: PathBuf,
    active: bool,
}

impl DnsManager {
    /// A manager writing `resolv_conf` (normally `/etc/resolv.conf`) with its
    /// backup at `backup`.
    pub fn new(
        backend: DnsBackend,
        interface: &str,
        resolv_conf: PathBuf,
        backup: PathBuf,
    ) -> Self {
        Self {
            backend,
            interface: interface.to_owned(),
            resolv_conf,
            backup,
            active: false,
        }
    }

    /// True while this manager has DNS settings of its own in place.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The backend in use.
    pub fn backend(&self) -> DnsBackend {
        self.backend
    }

    /// Puts back what a previous run left (a backup means it did not get to
    /// restore the file).
    pub fn recover(&mut self) -> Result<bool, DnsError> {
        if self.backup.exists() {
            info!(backup = %self.backup.display(), "restoring resolv.conf left by a previous run");
            self.restore_file()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Applies `config`; an empty config withdraws ours.
    pub async fn apply(&mut self, config: &DnsConfig) -> Result<(), DnsError> {
        let empty = config.nameservers.is_empty() && config.search_domains.is_empty();
        match self.backend {
            DnsBackend::Off => Ok(()),
            DnsBackend::File if empty => self.restore(),
            DnsBackend::File => self.write_file(config),
            DnsBackend::Resolved if empty => self.revert_resolved().await,
            DnsBackend::Resolved => {
                let mut args = vec!["dns".to_owned(), self.interface.clone()];
                args.extend(config.nameservers.iter().map(|ip| ip.to_string()));
                resolvectl(&args).await?;
                let mut args = vec!["domain".to_owned(), self.interface.clone()];
                if config.search_domains.is_empty() {
                    args.push("~.".into());
                } else {
                    args.extend(config.search_domains.iter().cloned());
                }
                resolvectl(&args).await?;
                self.active = true;
                Ok(())
            }
        }
    }

    /// Flushes the resolver's caches (systemd-resolved only: a plain
    /// resolv.conf has no cache to flush).
    pub async fn flush(&self) -> Result<(), DnsError> {
        if self.backend == DnsBackend::Resolved {
            resolvectl(&["flush-caches".to_owned()]).await?;
        }
        Ok(())
    }

    /// Withdraws whatever this manager set.
    pub async fn shutdown(&mut self) -> Result<(), DnsError> {
        match self.backend {
            DnsBackend::File => self.restore(),
            DnsBackend::Resolved if self.active => self.revert_resolved().await,
            _ => Ok(()),
        }
    }

    async fn revert_resolved(&mut self) -> Result<(), DnsError> {
        self.active = false;
        resolvectl(&["revert".to_owned(), self.interface.clone()]).await
    }

    fn write_file(&mut self, config: &DnsConfig) -> Result<(), DnsError> {
        if !self.backup.exists() {
            let header = match fs::read_link(&self.resolv_conf) {
                Ok(target) => format!("{BACKUP_HEADER_LINK}{}\n", target.display()),
                Err(_) => BACKUP_HEADER_FILE.to_owned(),
            };
            let original = match fs::read_to_string(&self.resolv_conf) {
                Ok(text) => text,
                Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(file_err(&self.resolv_conf)(e)),
            };
            if let Some(dir) = self.backup.parent() {
                fs::create_dir_all(dir).map_err(file_err(dir))?;
            }
            fs::write(&self.backup, format!("{header}{original}"))
                .map_err(file_err(&self.backup))?;
            if header.starts_with(BACKUP_HEADER_LINK) {
                // Replace the link by a file of our own rather than write
                // through it into a file another program owns.
                fs::remove_file(&self.resolv_conf).map_err(file_err(&self.resolv_conf))?;
            }
        }
        let mut text = format!(
            "# Written by wgmeshd for {}; the original is restored on exit.\n",
            self.interface
        );
        for ns in &config.nameservers {
            text.push_str(&format!("nameserver {ns}\n"));
        }
        if !config.search_domains.is_empty() {
            text.push_str(&format!("search {}\n", config.search_domains.join(" ")));
        }
        write_in_place(&self.resolv_conf, &text)?;
        self.active = true;
        info!(path = %self.resolv_conf.display(), servers = config.nameservers.len(), "resolv.conf written");
        Ok(())
    }

    fn restore(&mut self) -> Result<(), DnsError> {
        if self.backup.exists() {
            self.restore_file()?;
            info!(path = %self.resolv_conf.display(), "resolv.conf restored");
        }
        self.active = false;
        Ok(())
    }

    fn restore_file(&self) -> Result<(), DnsError> {
        let saved = fs::read_to_string(&self.backup).map_err(file_err(&self.backup))?;
        let (header, original) = saved.split_once('\n').unwrap_or((saved.as_str(), ""));
        if let Some(target) = header.strip_prefix(BACKUP_HEADER_LINK.trim_end_matches('\n')) {
            let _ = fs::remove_file(&self.resolv_conf);
            std::os::unix::fs::symlink(target.trim(), &self.resolv_conf)
                .map_err(file_err(&self.resolv_conf))?;
        } else {
            write_in_place(&self.resolv_conf, original)?;
        }
        fs::remove_file(&self.backup).map_err(file_err(&self.backup))?;
        Ok(())
    }
}

/// Truncates and rewrites `path` without replacing the inode. A symlink at
/// `path` (another program re-created one while wgmeshd manages the file) is
/// never written through: it is replaced by a file of wgmeshd's own, so the
/// file it points to, which another program owns, is left alone.
fn write_in_place(path: &Path, text: &str) -> Result<(), DnsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let open = || {
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    };
    let mut file = match open() {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            warn!(path = %path.display(), "a symlink replaced the managed file; replacing it by a file instead of writing through it");
            fs::remove_file(path).map_err(file_err(path))?;
            open().map_err(file_err(path))?
        }
        Err(e) => return Err(file_err(path)(e)),
    };
    file.write_all(text.as_bytes()).map_err(file_err(path))
}

async fn resolvectl(args: &[String]) -> Result<(), DnsError> {
    let joined = args.join(" ");
    let output = tokio::process::Command::new("resolvectl")
        .args(args)
        .output()
        .await
        .map_err(|e| DnsError::Resolvectl {
            args: joined.clone(),
            message: e.to_string(),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        let message = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        warn!(args = %joined, %message, "resolvectl failed");
        Err(DnsError::Resolvectl {
            args: joined,
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns(servers: &[&str]) -> DnsConfig {
        DnsConfig {
            nameservers: servers.iter().map(|s| s.parse().unwrap()).collect(),
            search_domains: vec!["tail.example".into()],
        }
    }

    #[tokio::test]
    async fn file_is_written_backed_up_and_restored() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        let backup = dir.path().join("state/wg0.resolv.bak");
        fs::write(&conf, "nameserver 9.9.9.9\n").unwrap();
        let mut m = DnsManager::new(DnsBackend::File, "wg0", conf.clone(), backup.clone());
        m.apply(&dns(&["100.100.100.100"])).await.unwrap();
        let text = fs::read_to_string(&conf).unwrap();
        assert!(text.contains("nameserver 100.100.100.100\n"), "{text}");
        assert!(text.contains("search tail.example\n"));
        assert!(!text.contains("9.9.9.9"));
        // A second apply keeps the first backup (the true original).
        m.apply(&dns(&["100.100.100.101"])).await.unwrap();
        m.shutdown().await.unwrap();
        assert_eq!(fs::read_to_string(&conf).unwrap(), "nameserver 9.9.9.9\n");
        assert!(!backup.exists());
    }

    #[tokio::test]
    async fn a_symlink_recreated_while_managed_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        let backup = dir.path().join("wg0.resolv.bak");
        fs::write(&conf, "nameserver 9.9.9.9\n").unwrap();
        let mut m = DnsManager::new(DnsBackend::File, "wg0", conf.clone(), backup.clone());
        m.apply(&dns(&["100.100.100.100"])).await.unwrap();
        assert!(backup.exists());
        // Another program puts its link back while the backup exists.
        let theirs = dir.path().join("stub-resolv.conf");
        fs::write(&theirs, "nameserver 127.0.0.53\n").unwrap();
        fs::remove_file(&conf).unwrap();
        std::os::unix::fs::symlink(&theirs, &conf).unwrap();
        m.apply(&dns(&["100.100.100.101"])).await.unwrap();
        assert_eq!(
            fs::read_to_string(&theirs).unwrap(),
            "nameserver 127.0.0.53\n"
        );
        assert!(
            !fs::symlink_metadata(&conf)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(
            fs::read_to_string(&conf)
                .unwrap()
                .contains("nameserver 100.100.100.101")
        );
        m.shutdown().await.unwrap();
        assert_eq!(fs::read_to_string(&conf).unwrap(), "nameserver 9.9.9.9\n");
        assert_eq!(
            fs::read_to_string(&theirs).unwrap(),
            "nameserver 127.0.0.53\n"
        );
    }

    #[tokio::test]
    async fn a_crash_is_recovered_on_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        let backup = dir.path().join("wg0.resolv.bak");
        fs::write(dir.path().join("real"), "nameserver 1.1.1.1\n").unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), &conf).unwrap();
        let mut m = DnsManager::new(DnsBackend::File, "wg0", conf.clone(), backup.clone());
        m.apply(&dns(&["100.100.100.100"])).await.unwrap();
        assert!(
            fs::read_link(&conf).is_err(),
            "the link was replaced by a file"
        );
        // The real target is untouched.
        assert_eq!(
            fs::read_to_string(dir.path().join("real")).unwrap(),
            "nameserver 1.1.1.1\n"
        );
        drop(m); // a crash: no shutdown

        let mut next = DnsManager::new(DnsBackend::File, "wg0", conf.clone(), backup.clone());
        assert!(next.recover().unwrap());
        assert_eq!(fs::read_link(&conf).unwrap(), dir.path().join("real"));
        assert!(!next.recover().unwrap());
    }

    #[tokio::test]
    async fn empty_config_restores_and_off_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        let backup = dir.path().join("b");
        fs::write(&conf, "orig\n").unwrap();
        let mut m = DnsManager::new(DnsBackend::File, "wg0", conf.clone(), backup.clone());
        m.apply(&dns(&["100.100.100.100"])).await.unwrap();
        m.apply(&DnsConfig::default()).await.unwrap();
        assert_eq!(fs::read_to_string(&conf).unwrap(), "orig\n");

        let mut off = DnsManager::new(DnsBackend::Off, "wg0", conf.clone(), backup);
        off.apply(&dns(&["100.100.100.100"])).await.unwrap();
        assert_eq!(fs::read_to_string(&conf).unwrap(), "orig\n");
        assert_eq!(detect(DnsMode::Off, &conf), DnsBackend::Off);
        assert_eq!(detect(DnsMode::Auto, &conf), DnsBackend::File);
    }
}
