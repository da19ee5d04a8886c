//! The agent's Unix socket: created `0600` (`0660` for a named group) in a
//! private directory, and the peer-credential check every connection passes
//! before the agent reads a byte from it.
//!
//! The directory (the socket path's parent) is created `0700` (`0710`,
//! group-owned by the named group, with `--group`) if it does not exist. If
//! it exists it must be a real directory (not a symbolic link) owned by the
//! agent's user and closed to others: no access at all for "other", and for
//! the group none (or search only, and group-owned by the named group, with
//! `--group`). So `/tmp/agent.sock` is refused and
//! `$XDG_RUNTIME_DIR/remem/agent.sock` or `/run/remem/agent.sock` is fine.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use super::error::AgentError;
use crate::sys::PeerCred;

/// Who may talk to the agent: its own user, and the members of one group.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    /// The agent's effective uid.
    pub uid: u32,
    /// The group named on the command line: (name, gid).
    pub group: Option<(String, u32)>,
}

impl Policy {
    /// `Ok` when `cred` is the agent's user or a member of the group.
    pub(crate) fn check(&self, cred: &PeerCred) -> Result<(), AgentError> {
        if cred.uid == self.uid {
            return Ok(());
        }
        if let Some((name, gid)) = &self.group {
            if cred.gid == *gid || cred.groups.contains(gid) {
                return Ok(());
            }
            return Err(AgentError::NotAllowed(format!(
                "pid {} runs as uid {}, neither the agent's user (uid {}) nor a member of group {name}",
                cred.pid, cred.uid, self.uid
            )));
        }
        Err(AgentError::NotAllowed(format!(
            "pid {} runs as uid {}, not the agent's user (uid {}); start the agent with --group to admit a group",
            cred.pid, cred.uid, self.uid
        )))
    }
}

fn sock_err(msg: String) -> AgentError {
    AgentError::Socket(msg)
}

/// Makes (or checks) the private directory and binds the socket in it.
pub(crate) fn bind(path: &Path, policy: &Policy) -> Result<UnixListener, AgentError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let gid = policy.group.as_ref().map(|g| g.1);
    let dir_mode = if gid.is_some() { 0o710 } else { 0o700 };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(up) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(up).map_err(|e| sock_err(format!("creating {}: {e}", up.display())))?;
            }
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(|e| sock_err(format!("creating the private directory {}: {e}", dir.display())))?;
            if let Some(g) = gid {
                std::os::unix::fs::chown(dir, None, Some(g))
                    .map_err(|e| sock_err(format!("giving {} to group {g}: {e}", dir.display())))?;
            }
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))
                .map_err(|e| sock_err(format!("chmod {}: {e}", dir.display())))?;
        }
        Err(e) => return Err(sock_err(format!("{}: {e}", dir.display()))),
        Ok(meta) => check_dir(dir, &meta, policy)?,
    }
    match std::fs::symlink_metadata(path) {
        Ok(_) if UnixStream::connect(path).is_ok() => {
            return Err(sock_err(format!("another agent is listening on {}", path.display())));
        }
        Ok(meta) if meta.file_type().is_dir() => {
            return Err(sock_err(format!("{} is a directory", path.display())));
        }
        // A stale socket (or file) left in our private directory.
        Ok(_) => std::fs::remove_file(path).map_err(|e| sock_err(format!("removing {}: {e}", path.display())))?,
        Err(_) => {}
    }
    // Nobody else can reach the directory, so the socket's mode can be set
    // after bind without a window.
    let listener = UnixListener::bind(path).map_err(|e| sock_err(format!("binding {}: {e}", path.display())))?;
    if let Some(g) = gid {
        std::os::unix::fs::chown(path, None, Some(g))
            .map_err(|e| sock_err(format!("giving {} to group {g}: {e}", path.display())))?;
    }
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| sock_err(format!("chmod {}: {e}", path.display())))?;
    Ok(listener)
}

fn check_dir(dir: &Path, meta: &std::fs::Metadata, policy: &Policy) -> Result<(), AgentError> {
    let hint = "pass a socket path in a private directory the agent creates or owns, e.g. \
                $XDG_RUNTIME_DIR/remem/agent.sock or /run/remem/agent.sock";
    if !meta.file_type().is_dir() {
        return Err(sock_err(format!("{} is not a directory (symbolic links are refused); {hint}", dir.display())));
    }
    if meta.uid() != policy.uid {
        return Err(sock_err(format!(
            "{} belongs to uid {}, not to the agent's user (uid {}); {hint}",
            dir.display(),
            meta.uid(),
            policy.uid
        )));
    }
    let mode = meta.mode() & 0o777;
    let group_ok = match policy.group {
        Some((_, g)) => mode & 0o060 == 0 && (mode & 0o070 == 0 || meta.gid() == g),
        None => mode & 0o070 == 0,
    };
    if mode & 0o007 != 0 || !group_ok {
        return Err(sock_err(format!(
            "{} has mode {mode:o}: others can reach the socket; make it 0700 (0710 for --group) or {hint}",
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_is_private_and_shared_directories_are_refused() {
        let base = std::env::temp_dir().join(format!("remem-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let policy = Policy { uid: crate::sys::euid(), group: None };
        let path = base.join("agent").join("agent.sock");
        let l = bind(&path, &policy).unwrap();
        let dmode = std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777;
        let smode = std::fs::symlink_metadata(&path).unwrap().mode() & 0o777;
        assert_eq!((dmode, smode), (0o700, 0o600));
        // A live socket is not stolen.
        let e = bind(&path, &policy).unwrap_err();
        assert!(e.to_string().contains("another agent"), "{e}");
        drop(l);
        // A stale one is replaced.
        bind(&path, &policy).unwrap();
        // A directory others can enter is refused.
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = bind(&base.join("agent.sock"), &policy).unwrap_err();
        assert!(e.to_string().contains("mode 755"), "{e}");
        let e = bind(Path::new("/tmp/remem-agent-test.sock"), &policy).unwrap_err();
        assert!(e.to_string().contains("/tmp"), "{e}");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn peers_of_another_user_are_refused_unless_in_the_group() {
        let me = Policy { uid: 1000, group: None };
        let peer = |uid, gid, groups: Vec<u32>| PeerCred { pid: 7, uid, gid, groups };
        assert!(me.check(&peer(1000, 5, vec![])).is_ok());
        assert!(me.check(&peer(0, 0, vec![])).is_err(), "root is another user too");
        let grp = Policy { uid: 1000, group: Some(("db".into(), 77)) };
        assert!(grp.check(&peer(1001, 77, vec![])).is_ok());
        assert!(grp.check(&peer(1001, 5, vec![9, 77])).is_ok());
        let e = grp.check(&peer(1001, 5, vec![9])).unwrap_err();
        assert!(e.to_string().contains("group db"), "{e}");
    }
}
