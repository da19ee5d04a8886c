//! What the agent checks before it maps anything a peer handed over: the
//! heap memfd (sealed against resizing, exactly the size its header
//! states), the control memfd (sealed, its header consistent with the heap
//! and its exact length), and the baseline (readable by the registrant,
//! opened read-only, belonging to that heap).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use remem_alloc::baseline::format::Superblock;
use remem_alloc::ctl;
use remem_alloc::format::{uuid_string, Header};

use super::error::AgentError;
use super::layout::u64_at;
use crate::sys::{self, PeerCred, SEALS_FIXED_SIZE};

const PAGE: u64 = 4096;

/// A registration's descriptors, checked.
#[derive(Debug)]
pub(crate) struct Checked {
    /// The heap's header, decoded from the memfd.
    pub header: Header,
    /// The heap memfd: `header.layout.size` bytes, size sealed.
    pub heap: File,
    /// The control memfd, size sealed, `control_len` bytes.
    pub control: File,
    /// Tracking mode from the control header.
    pub mode: u32,
    /// Owner pid the control region names.
    pub control_pid: u64,
    /// Offsets of the current and closing sets in the control region.
    pub sets: (u64, u64),
}

fn bad(what: impl Into<String>) -> AgentError {
    AgentError::BadMemfd(what.into())
}

/// Checks that `fd` is a memfd sealed against shrinking and growing; returns its length.
fn sealed_len(fd: &OwnedFd, name: &str) -> Result<(File, u64), AgentError> {
    let seals = match sys::seals(fd) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            return Err(bad(format!("the {name} descriptor is not a memfd")));
        }
        Err(e) => return Err(bad(format!("reading the seals of the {name} memfd: {e}"))),
    };
    if seals & SEALS_FIXED_SIZE != SEALS_FIXED_SIZE {
        return Err(bad(format!(
            "the {name} memfd is not sealed against resizing (F_SEAL_SHRINK | F_SEAL_GROW missing; seals {seals:#x}): \
             create it with MFD_ALLOW_SEALING and add the seals"
        )));
    }
    let file = File::from(fd.try_clone().map_err(|e| bad(format!("dup of the {name} memfd: {e}")))?);
    let len = file.metadata().map_err(|e| bad(format!("stat of the {name} memfd: {e}")))?.len();
    Ok((file, len))
}

/// Checks a registration's two descriptors (heap memfd, control memfd).
pub(crate) fn check_memfds(fds: Vec<OwnedFd>) -> Result<Checked, AgentError> {
    let n = fds.len();
    let mut fds = fds.into_iter();
    let (Some(heap_fd), Some(ctl_fd), None) = (fds.next(), fds.next(), fds.next()) else {
        return Err(AgentError::Protocol(format!(
            "a registration carries exactly two descriptors (the heap and control memfds), not {n}"
        )));
    };
    let (heap, len) = sealed_len(&heap_fd, "heap")?;
    if len < PAGE {
        return Err(bad(format!("the heap memfd is {len} bytes: too short to hold a heap header")));
    }
    let mut first = vec![0u8; PAGE as usize];
    heap.read_exact_at(&mut first, 0).map_err(|e| bad(format!("reading the heap header: {e}")))?;
    let header = Header::decode(&first).map_err(|e| bad(format!("the memfd does not hold a heap: {e}")))?;
    let size = header.layout.size;
    if len != size {
        return Err(bad(format!("the heap memfd is {len} bytes, its header says the heap is {size}")));
    }
    let npages = header.layout.npages();
    let (control, clen) = sealed_len(&ctl_fd, "control")?;
    let words = npages.div_ceil(64);
    let set_bytes = (words * 8).next_multiple_of(PAGE);
    let want = PAGE + 2 * set_bytes;
    if clen != want {
        return Err(bad(format!("the control memfd is {clen} bytes; a heap of {npages} pages needs {want}")));
    }
    let mut h = vec![0u8; PAGE as usize];
    control.read_exact_at(&mut h, 0).map_err(|e| bad(format!("reading the control header: {e}")))?;
    if h[ctl::MAGIC..ctl::MAGIC + 8] != ctl::MAGIC_BYTES {
        return Err(bad("the control memfd has no control header (bad magic)"));
    }
    let field = |at: usize| u64_at(&h, at).unwrap_or(u64::MAX);
    let version = u32::from_le_bytes([h[ctl::VERSION], h[ctl::VERSION + 1], h[ctl::VERSION + 2], h[ctl::VERSION + 3]]);
    let mode = u32::from_le_bytes([h[ctl::MODE], h[ctl::MODE + 1], h[ctl::MODE + 2], h[ctl::MODE + 3]]);
    if version != 1 || mode > 2 {
        return Err(bad(format!("the control region has version {version}, mode {mode}: not one this agent reads")));
    }
    if h[ctl::UUID..ctl::UUID + 16] != header.uuid {
        return Err(bad("the control region belongs to another heap (UUID)"));
    }
    let sets = (field(ctl::CURRENT_OFF), field(ctl::CLOSING_OFF));
    if field(ctl::NPAGES) != npages || field(ctl::WORDS) != words || sets != (PAGE, PAGE + set_bytes) {
        return Err(bad(format!(
            "the control header does not match a heap of {npages} pages (npages {}, words {}, sets at {} and {})",
            field(ctl::NPAGES),
            field(ctl::WORDS),
            sets.0,
            sets.1
        )));
    }
    Ok(Checked { header, heap, control, mode, control_pid: field(ctl::OWNER_PID), sets })
}

/// Whether a process with credentials `cred` may read a file of `meta`
/// (its mode bits; ACLs are not consulted, so an ACL-only grant is refused).
fn may_read(meta: &std::fs::Metadata, cred: &PeerCred) -> bool {
    let mode = meta.mode();
    if cred.uid == 0 {
        return true;
    }
    if meta.uid() == cred.uid {
        return mode & 0o400 != 0;
    }
    if meta.gid() == cred.gid || cred.groups.contains(&meta.gid()) {
        return mode & 0o040 != 0;
    }
    mode & 0o004 != 0
}

/// The newest valid superblock of the baseline in `file`.
pub(crate) fn newest_superblock(file: &File) -> Result<Superblock, String> {
    let mut b = vec![0u8; 2 * PAGE as usize];
    file.read_exact_at(&mut b, 0).map_err(|e| format!("reading the superblocks: {e}"))?;
    let slot = |s: usize| Superblock::decode(&b[s * PAGE as usize..]).ok().filter(|sb| sb.slot() == s as u64);
    match (slot(0), slot(1)) {
        (Some(a), Some(c)) => Ok(if a.seq > c.seq { a } else { c }),
        (Some(s), None) | (None, Some(s)) => Ok(s),
        (None, None) => Err("no valid superblock".into()),
    }
}

/// Opens the registrant's baseline read-only, as the agent, after checking
/// that the registrant (`cred`) may read it, and that it is the baseline of
/// heap `uuid` of `size` bytes. Returns it and its generation.
pub(crate) fn open_baseline(
    path: &Path,
    cred: &PeerCred,
    uuid: &[u8; 16],
    size: u64,
) -> Result<(File, u64), AgentError> {
    let refuse = |why: String| AgentError::NotAllowed(format!("baseline {}: {why}", path.display()));
    if !path.is_absolute() {
        return Err(refuse("the path must be absolute (the agent does not share the registrant's directory)".into()));
    }
    // O_NONBLOCK: a FIFO named as the baseline must not hang the agent.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| refuse(format!("cannot open it read-only: {e}")))?;
    let meta = file.metadata().map_err(|e| refuse(format!("stat: {e}")))?;
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    if !may_read(&meta, cred) {
        return Err(refuse(format!(
            "the registrant (pid {}, uid {}) may not read it (owner uid {}, group {}, mode {:o}): the agent reads a \
             baseline only for a registrant that can",
            cred.pid,
            cred.uid,
            meta.uid(),
            meta.gid(),
            meta.mode() & 0o7777
        )));
    }
    let sb = newest_superblock(&file).map_err(|e| refuse(format!("not a baseline: {e}")))?;
    if sb.uuid != *uuid || sb.heap_size != size {
        return Err(refuse(format!(
            "it is the baseline of heap {} ({} bytes), not of the heap registered ({}, {size} bytes)",
            uuid_string(&sb.uuid),
            sb.heap_size,
            uuid_string(uuid)
        )));
    }
    Ok((file, sb.generation))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn read_permission_follows_the_mode_bits() {
        let dir = std::env::temp_dir().join(format!("remem-validate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, b"x").unwrap();
        let me = PeerCred { pid: 1, uid: sys::euid(), gid: 12345, groups: vec![] };
        let other = PeerCred { pid: 1, uid: 54321, gid: 54321, groups: vec![] };
        for (mode, owner, stranger) in [(0o600, true, false), (0o644, true, true), (0o200, false, false)] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let meta = std::fs::metadata(&f).unwrap();
            assert_eq!(may_read(&meta, &me) || me.uid == 0, owner || me.uid == 0, "mode {mode:o}");
            assert_eq!(may_read(&meta, &other), stranger, "mode {mode:o}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn descriptors_that_are_not_memfds_are_refused() {
        let f = File::open("/proc/self/exe").unwrap();
        let e = check_memfds(vec![f.into()]).unwrap_err();
        assert!(e.to_string().contains("exactly two"), "{e}");
        let (a, b) = (File::open("/proc/self/exe").unwrap(), File::open("/proc/self/exe").unwrap());
        let e = check_memfds(vec![a.into(), b.into()]).unwrap_err();
        assert!(e.to_string().contains("not a memfd"), "{e}");
    }
}
