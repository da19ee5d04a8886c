//! Directories for the files a run makes (heap baselines, the raw-write
//! file of the `flush` suite), removed when dropped, and a name for the
//! filesystem they are on (for the legends: a flush figure means nothing
//! without it).

use std::ffi::CString;
use std::path::{Path, PathBuf};

/// A directory of this run, `<base>/remem-bench-<pid>-<tag>`, removed with
/// everything in it on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates the directory (removing one of ours left by a crashed run
    /// with the same pid first).
    pub fn new(base: &Path, tag: &str) -> Result<ScratchDir, String> {
        let path = base.join(format!("remem-bench-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        Ok(ScratchDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `"<dir> (<filesystem>)"`, for legends.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.path.display(), fs_type(&self.path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("remem-bench: could not remove {}: {e}", self.path.display());
        }
    }
}

/// The type of the filesystem holding `path` (`ext4`, `tmpfs`, ...), from
/// statfs(2)'s magic number.
pub fn fs_type(path: &Path) -> String {
    let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return "unknown filesystem".to_owned();
    };
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `st` is a valid destination;
    // both outlive the call.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return format!("statfs failed: {}", std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    let magic = st.f_type as u64;
    match magic {
        0xEF53 => "ext4".to_owned(),
        0x5846_5342 => "xfs".to_owned(),
        0x9123_683E => "btrfs".to_owned(),
        0x0102_1994 => "tmpfs".to_owned(),
        0x794C_7630 => "overlayfs".to_owned(),
        0xF2F5_2010 => "f2fs".to_owned(),
        0x2FC1_2FC1 => "zfs".to_owned(),
        0x6969 => "nfs".to_owned(),
        m => format!("filesystem magic {m:#x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_dir_is_made_and_removed() {
        let path = {
            let d = ScratchDir::new(&std::env::temp_dir(), "scratch-test").unwrap();
            std::fs::write(d.path().join("f"), b"x").unwrap();
            assert!(d.path().is_dir());
            assert!(!d.describe().is_empty());
            d.path().to_owned()
        };
        assert!(!path.exists());
    }

    #[test]
    fn dev_shm_is_tmpfs() {
        if Path::new("/dev/shm").is_dir() {
            assert_eq!(fs_type(Path::new("/dev/shm")), "tmpfs");
        }
    }
}
