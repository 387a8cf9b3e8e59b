//! The daemon's local unix sockets (the API and the WireGuard UAPI): safe
//! creation, caller checks and connection limits.
//!
//! A socket's protection must not depend on the umask wgmeshd inherited: the
//! directory is created with an explicit mode and then checked through a
//! descriptor (`O_NOFOLLOW`, `fstat`), so a symlink or a directory another
//! user controls is refused; the socket is bound under `umask(0o077)` (0o007
//! when a group may use it), so it never exists with a wider mode, not even
//! for an instant, and nothing is `chmod`ed by path afterwards. Each
//! connection's caller is then checked with `SO_PEERCRED`: file modes alone
//! are one misconfiguration away from letting anyone in.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{OFlag, open};
use nix::sys::stat::{Mode, fchmod, umask};
use nix::unistd::{Gid, Group, Uid, User, fchown, getgrouplist};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

/// How many connections one socket serves at once; more are closed at once.
/// The CLI and `wg` open one at a time; the bound keeps a local user from
/// exhausting the daemon's descriptors or memory through it.
pub const MAX_CONNECTIONS_PER_SOCKET: usize = 32;

/// How long one request may take to arrive in full. A client that trickles
/// bytes (or sends nothing) is cut off.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a local socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LocalSocketError {
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The directory exists but is not safe to put a socket in.
    #[error("{path}: {reason}; refusing to put a control socket there")]
    UnsafeDirectory {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The socket path has no parent directory or no file name.
    #[error("{0}: not a usable socket path")]
    BadPath(PathBuf),
    /// The group named for read-only access does not exist.
    #[error("API group {0:?} does not exist")]
    UnknownGroup(String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LocalSocketError {
    let path = path.to_owned();
    move |source| LocalSocketError::Io { what, path, source }
}

fn errno_err(what: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> LocalSocketError {
    let path = path.to_owned();
    move |e| LocalSocketError::Io {
        what,
        path,
        source: std::io::Error::from(e),
    }
}

/// Who may use a socket beyond root and the daemon's own user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SocketAccess {
    /// A group whose members may connect and run read-only commands.
    pub read_group: Option<Gid>,
}

impl SocketAccess {
    /// Looks up the group named in the config.
    pub fn with_group_name(name: Option<&str>) -> Result<Self, LocalSocketError> {
        let read_group = match name {
            None => None,
            Some(name) => Some(
                Group::from_name(name)
                    .ok()
                    .flatten()
                    .ok_or_else(|| LocalSocketError::UnknownGroup(name.to_owned()))?
                    .gid,
            ),
        };
        Ok(Self { read_group })
    }
}

/// What a connecting process may do, from its `SO_PEERCRED` credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerRights {
    /// Root or the daemon's own user: everything, keys included.
    Admin,
    /// A member of the configured group: read-only commands (status, metrics).
    ReadOnly,
    /// Anyone else: nothing.
    None,
}

/// The rights of a caller with user `uid` and primary group `gid`.
pub fn caller_rights(uid: u32, gid: u32, access: SocketAccess) -> CallerRights {
    if uid == 0 || uid == Uid::effective().as_raw() {
        return CallerRights::Admin;
    }
    let Some(group) = access.read_group else {
        return CallerRights::None;
    };
    if gid == group.as_raw() || user_in_group(uid, gid, group) {
        CallerRights::ReadOnly
    } else {
        CallerRights::None
    }
}

/// The supplementary groups of the user, from the group database (the
/// kernel tells only the primary group of a socket's peer).
fn user_in_group(uid: u32, gid: u32, group: Gid) -> bool {
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return false;
    };
    let Ok(name) = CString::new(user.name) else {
        return false;
    };
    getgrouplist(&name, Gid::from_raw(gid)).is_ok_and(|groups| groups.contains(&group))
}

/// The rights of the process at the other end of `stream`.
pub fn stream_rights(stream: &UnixStream, access: SocketAccess) -> CallerRights {
    match stream.peer_cred() {
        Ok(cred) => caller_rights(cred.uid(), cred.gid(), access),
        Err(e) => {
            warn!(error = %e, "cannot read the caller's credentials; refusing");
            CallerRights::None
        }
    }
}

/// Makes sure `dir` is a directory owned by the daemon's user and writable by
/// no one else, creating it with `mode` when missing. A directory wgmeshd
/// owns gets `mode` through its descriptor; one owned by
/// someone else, a symlink, or a directory others may write is refused.
/// With a group, the directory is handed to it for traversal (mode 0o710).
pub fn prepare_directory(
    dir: &Path,
    mode: u32,
    group: Option<Gid>,
) -> Result<(), LocalSocketError> {
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The parents are created with the default mode, as `mkdir -p`
            // does; only the last component holds the socket.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir.parent().unwrap_or(dir))
                .map_err(io_err("create directory", dir))?;
            match std::fs::DirBuilder::new().mode(mode).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("create directory", dir)(e)),
            }
        }
        Err(e) => return Err(io_err("create directory", dir)(e)),
    }
    let fd = open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        nix::Error::ELOOP | nix::Error::ENOTDIR => LocalSocketError::UnsafeDirectory {
            path: dir.to_owned(),
            reason: "not a directory (a symlink?)".into(),
        },
        other => errno_err("open directory", dir)(other),
    })?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(io_err("stat directory", dir))?;
    let me = Uid::effective().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(LocalSocketError::UnsafeDirectory {
            path: dir.to_owned(),
            reason: format!("owned by uid {}, not by root or uid {me}", meta.uid()),
        });
    }
    let current = meta.mode() & 0o7777;
    let wanted = if group.is_some() {
        (mode & 0o700) | 0o010
    } else {
        mode
    };
    if meta.uid() != me {
        // Root's directory seen by a non-root daemon: usable only if no one
        // but root may write it.
        if current & 0o022 != 0 {
            return Err(LocalSocketError::UnsafeDirectory {
                path: dir.to_owned(),
                reason: format!("mode {current:o} lets others write it"),
            });
        }
        return Ok(());
    }
    if let Some(group) = group {
        fchown(file.as_fd(), None, Some(group)).map_err(errno_err("chown directory", dir))?;
    }
    if current != wanted {
        debug!(dir = %dir.display(), from = format!("{current:o}"), to = format!("{wanted:o}"), "setting the directory's mode");
        fchmod(
            file.as_fd(),
            Mode::from_bits_truncate(wanted as nix::libc::mode_t),
        )
        .map_err(errno_err("chmod directory", dir))?;
    }
    Ok(())
}

/// Raises the soft limit of open descriptors to the hard limit, as Go
/// programs do at start: the daemon's sockets and connections must not fail
/// at the 1024 many systems set for historical reasons. Returns the new soft
/// limit (the old one when it cannot be raised, which is logged).
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            debug!(from = soft, to = hard, "raised the open-descriptor limit");
            hard
        }
        Err(e) => {
            warn!(soft, hard, error = %e, "cannot raise the open-descriptor limit");
            soft
        }
    }
}

/// Restores the previous umask when dropped.
struct UmaskGuard(Mode);

impl UmaskGuard {
    fn set(mask: u32) -> Self {
        Self(umask(Mode::from_bits_truncate(mask as nix::libc::mode_t)))
    }
}

impl Drop for UmaskGuard {
    fn drop(&mut self) {
        umask(self.0);
    }
}

/// Binds a control socket at `path`: the directory is prepared (created with
/// `dir_mode`, checked), a stale socket removed, and the socket bound under a
/// umask that leaves it 0o700 (0o770 with group `access.read_group`, which
/// then owns it). Nothing is changed by path after the bind but the group
/// (by `lchown`, in a directory only the daemon may write).
pub fn bind(
    path: &Path,
    dir_mode: u32,
    access: SocketAccess,
) -> Result<UnixListener, LocalSocketError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| LocalSocketError::BadPath(path.to_owned()))?;
    if path.file_name().is_none() {
        return Err(LocalSocketError::BadPath(path.to_owned()));
    }
    prepare_directory(dir, dir_mode, access.read_group)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_dir() => {
            return Err(LocalSocketError::UnsafeDirectory {
                path: path.to_owned(),
                reason: "a directory is where the socket goes".into(),
            });
        }
        Ok(_) => {
            std::fs::remove_file(path).map_err(io_err("remove stale socket", path))?;
            debug!(path = %path.display(), "removed a stale socket");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("stat socket", path)(e)),
    }
    let listener = {
        let _mask = UmaskGuard::set(if access.read_group.is_some() {
            0o007
        } else {
            0o077
        });
        UnixListener::bind(path).map_err(io_err("bind", path))?
    };
    if let Some(group) = access.read_group {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            path,
            None,
            Some(group),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(errno_err("chown socket", path))?;
    }
    Ok(listener)
}

/// A bound on the connections one socket serves at once.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
}

impl ConnectionLimit {
    /// Up to `max` connections at once.
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
        }
    }

    /// A permit for one more connection, or `None` when `max` are open.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }
}

/// Why a bounded line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadLineError {
    /// The line is longer than allowed.
    #[error("line longer than {0} bytes")]
    TooLong(usize),
    /// The line is not UTF-8.
    #[error("line is not valid UTF-8")]
    NotUtf8,
    /// The connection broke.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads one `\n`-terminated line of at most `max` bytes (the newline not
/// counted) without buffering more than `max + 1` bytes of it. `Ok(None)` at
/// the end of the stream; a last line without newline is returned as is.
pub async fn read_bounded_line<R>(
    reader: &mut R,
    max: usize,
) -> Result<Option<String>, ReadLineError>
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    use tokio::io::AsyncBufReadExt;
    let mut line = Vec::new();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            if line.is_empty() {
                return Ok(None);
            }
            break;
        }
        let (chunk, newline) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i)),
            None => (available, None),
        };
        if line.len() + chunk.len() > max {
            return Err(ReadLineError::TooLong(max));
        }
        line.extend_from_slice(chunk);
        let used = newline.map_or(chunk.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| ReadLineError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn root_and_the_daemons_user_are_admins_others_only_with_the_group() {
        let none = SocketAccess::default();
        assert_eq!(caller_rights(0, 0, none), CallerRights::Admin);
        let me = Uid::effective().as_raw();
        assert_eq!(caller_rights(me, 12345, none), CallerRights::Admin);
        let stranger = if me == 65534 { 65533 } else { 65534 };
        assert_eq!(caller_rights(stranger, 65534, none), CallerRights::None);
        let group = SocketAccess {
            read_group: Some(Gid::from_raw(4242)),
        };
        assert_eq!(caller_rights(stranger, 4242, group), CallerRights::ReadOnly);
        assert_eq!(caller_rights(stranger, 4243, group), CallerRights::None);
    }

    #[tokio::test]
    async fn the_socket_and_its_directory_are_private_whatever_the_umask() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("run");
        let path = dir.join("wg0.sock");
        // The daemon inherited the most permissive umask there is.
        let _open = UmaskGuard::set(0);
        let listener = bind(&path, 0o700, SocketAccess::default()).unwrap();
        drop(_open);
        let dir_mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        let sock_mode = std::fs::symlink_metadata(&path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        assert_eq!(sock_mode & 0o077, 0, "socket mode {sock_mode:o}");
        drop(listener);

        // A world-writable directory wgmeshd owns is narrowed, not trusted.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let _listener = bind(&path, 0o700, SocketAccess::default()).unwrap();
        let dir_mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
    }

    #[test]
    fn the_descriptor_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let low = soft.min(hard / 2).min(1024);
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
        assert_eq!(raise_nofile_limit(), hard);
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    }

    #[tokio::test]
    async fn a_symlinked_directory_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let real = base.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = bind(&link.join("wg0.sock"), 0o700, SocketAccess::default()).unwrap_err();
        assert!(
            matches!(err, LocalSocketError::UnsafeDirectory { .. }),
            "{err}"
        );
        assert!(!real.join("wg0.sock").exists());
    }

    #[tokio::test]
    async fn bounded_lines_refuse_long_lines_and_bad_utf8() {
        let input: &[u8] = b"get=1\nabcdefghij\n\xff\xfe\nlast";
        let mut reader = tokio::io::BufReader::with_capacity(4, input);
        assert_eq!(
            read_bounded_line(&mut reader, 8).await.unwrap().as_deref(),
            Some("get=1")
        );
        assert!(matches!(
            read_bounded_line(&mut reader, 8).await,
            Err(ReadLineError::TooLong(8))
        ));
        let mut reader = tokio::io::BufReader::new(&b"\xff\xfe\nlast"[..]);
        assert!(matches!(
            read_bounded_line(&mut reader, 8).await,
            Err(ReadLineError::NotUtf8)
        ));
        assert_eq!(
            read_bounded_line(&mut reader, 8).await.unwrap().as_deref(),
            Some("last")
        );
        assert_eq!(read_bounded_line(&mut reader, 8).await.unwrap(), None);
    }
}
