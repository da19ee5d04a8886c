//! What a target serves: memory it keeps mapped, seen as bytes.
//!
//! The agent serves the heap's memfd mapping (and a control region) by
//! wrapping a read-only mapping in a type that implements `AsRef<[u8]>`
//! (every such type is a [`SourceMemory`]). The TCP transport copies the
//! bytes of each response into a buffer of the connection (where it
//! computes their CRC and seals them); the verbs transport registers their
//! address with the device once.
//!
//! The bytes may change while they are served (the database may still be
//! writing the heap): a read returns what the memory holds when the target
//! (or its NIC) reads it, with no atomicity beyond the byte.

use std::ops::Deref;

use parking_lot::{RwLock, RwLockReadGuard};

/// Memory a target can serve.
///
/// `view` must return the same address and length every time: the verbs
/// transport registers the first view's address with the device and the
/// device keeps reading those pages. (A type that moved its bytes would
/// serve stale pages there, never freed ones: registered pages stay pinned.)
pub trait SourceMemory: Send + Sync + 'static {
    /// The bytes, readable while the view lives.
    fn view(&self) -> MemoryView<'_>;
}

impl<T: AsRef<[u8]> + Send + Sync + 'static> SourceMemory for T {
    fn view(&self) -> MemoryView<'_> {
        MemoryView::from(self.as_ref())
    }
}

/// A view of a [`SourceMemory`]'s bytes: a plain slice, or a lock guard.
pub struct MemoryView<'a>(ViewInner<'a>);

enum ViewInner<'a> {
    Slice(&'a [u8]),
    Shared(RwLockReadGuard<'a, Box<[u8]>>),
    Guard(Box<dyn Deref<Target = [u8]> + 'a>),
}

impl<'a> MemoryView<'a> {
    /// A view through a guard (e.g. of the implementor's own lock), held
    /// while the target serves a batch of reads from it.
    pub fn guarded(guard: impl Deref<Target = [u8]> + 'a) -> MemoryView<'a> {
        MemoryView(ViewInner::Guard(Box::new(guard)))
    }
}

impl<'a> From<&'a [u8]> for MemoryView<'a> {
    fn from(bytes: &'a [u8]) -> MemoryView<'a> {
        MemoryView(ViewInner::Slice(bytes))
    }
}

impl Deref for MemoryView<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            ViewInner::Slice(s) => s,
            ViewInner::Shared(g) => g,
            ViewInner::Guard(g) => g,
        }
    }
}

/// Bytes that the owner may change while they are served: a control region
/// of the agent, or test data. Writes wait for the TCP reads being copied
/// out (at most one 1 MiB buffer's worth per connection; never for a
/// socket write).
#[derive(Debug)]
pub struct SharedBytes {
    bytes: RwLock<Box<[u8]>>,
}

impl SharedBytes {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> SharedBytes {
        SharedBytes::from(vec![0u8; len])
    }

    /// The length, fixed for the value's life.
    pub fn len(&self) -> usize {
        self.bytes.read().len()
    }

    /// Whether the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `data` to `offset`; `false` (and nothing written) when it
    /// does not fit.
    pub fn write(&self, offset: usize, data: &[u8]) -> bool {
        let mut bytes = self.bytes.write();
        match offset.checked_add(data.len()).and_then(|end| bytes.get_mut(offset..end)) {
            Some(dst) => {
                dst.copy_from_slice(data);
                true
            }
            None => false,
        }
    }

    /// A copy of `len` bytes at `offset`, when in range.
    pub fn read(&self, offset: usize, len: usize) -> Option<Vec<u8>> {
        let bytes = self.bytes.read();
        offset.checked_add(len).and_then(|end| bytes.get(offset..end)).map(<[u8]>::to_vec)
    }
}

impl From<Vec<u8>> for SharedBytes {
    fn from(v: Vec<u8>) -> SharedBytes {
        SharedBytes { bytes: RwLock::new(v.into_boxed_slice()) }
    }
}

impl SourceMemory for SharedBytes {
    fn view(&self) -> MemoryView<'_> {
        MemoryView(ViewInner::Shared(self.bytes.read()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn views_are_stable_and_see_writes() {
        let s = Arc::new(SharedBytes::zeroed(64));
        let mem: Arc<dyn SourceMemory> = s.clone();
        let p = mem.view().as_ptr();
        assert!(s.write(60, &[1, 2, 3, 4]));
        assert!(!s.write(61, &[1, 2, 3, 4]));
        assert!(!s.write(usize::MAX, &[1]));
        let v = mem.view();
        assert_eq!(v.as_ptr(), p, "SharedBytes never moves its bytes");
        assert_eq!(&v[60..], &[1, 2, 3, 4]);
        drop(v);
        assert_eq!(s.read(62, 2), Some(vec![3, 4]));
        assert_eq!(s.read(63, 2), None);

        let plain: Arc<dyn SourceMemory> = Arc::new(vec![7u8; 10]);
        assert_eq!(&*plain.view(), &[7u8; 10]);
        let guarded = MemoryView::guarded(vec![1u8, 2]);
        assert_eq!(&*guarded, &[1, 2]);
    }
}
