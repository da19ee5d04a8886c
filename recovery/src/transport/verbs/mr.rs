//! Memory registrations: the target's read-only regions and the
//! initiator's landing buffers.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::{ibv_access_flags, ibv_dereg_mr, ibv_mr, ibv_reg_mr};

use super::device::Device;
use crate::transport::DeviceError;

/// Landing buffers are page-aligned.
const ALIGN: usize = 4096;

/// A registered memory region; deregistered on drop.
pub(crate) struct Mr {
    mr: NonNull<ibv_mr>,
    _dev: Arc<Device>,
}

// SAFETY: an MR handle may be used and deregistered from any thread
// (libibverbs is thread-safe); `Mr` only reads its keys after creation.
unsafe impl Send for Mr {}
// SAFETY: as above; no interior mutability.
unsafe impl Sync for Mr {}

impl Mr {
    /// Registers `[addr, addr + len)` in the device's protection domain.
    ///
    /// # Safety
    ///
    /// The range must be mapped memory that stays mapped until the `Mr` is
    /// dropped. With `IBV_ACCESS_LOCAL_WRITE` the device writes into it
    /// whenever a read completes, so no Rust reference to the range may be
    /// alive while a read into it is outstanding.
    pub(crate) unsafe fn register(
        dev: &Arc<Device>,
        addr: *mut u8,
        len: usize,
        access: ibv_access_flags,
    ) -> Result<Mr, DeviceError> {
        // SAFETY: the PD is alive (held by `dev`, which the Mr keeps); the
        // caller vouches for the range.
        let mr = unsafe { ibv_reg_mr(dev.pd(), addr.cast(), len, access.0 as i32) };
        let mr = NonNull::new(mr)
            .ok_or_else(|| DeviceError::Call { what: "ibv_reg_mr", source: std::io::Error::last_os_error() })?;
        Ok(Mr { mr, _dev: dev.clone() })
    }

    fn get(&self) -> &ibv_mr {
        // SAFETY: the MR is registered until drop; libibverbs never changes
        // its public fields after ibv_reg_mr returns.
        unsafe { self.mr.as_ref() }
    }

    pub(crate) fn addr(&self) -> u64 {
        self.get().addr as u64
    }

    pub(crate) fn rkey(&self) -> u32 {
        self.get().rkey
    }

    pub(crate) fn lkey(&self) -> u32 {
        self.get().lkey
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered by `register`, deregistered once, here.
        unsafe { ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

/// A zeroed, page-aligned buffer registered for local write: where RDMA
/// READ results land.
pub(crate) struct LocalBuf {
    // Deregistered before the memory is freed (see Drop).
    mr: Option<Mr>,
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is owned memory; the device writes into it only while
// a read is outstanding, which the initiator tracks, and the initiator
// moves between threads as a whole.
unsafe impl Send for LocalBuf {}

impl LocalBuf {
    pub(crate) fn new(dev: &Arc<Device>, len: usize) -> Option<Result<LocalBuf, DeviceError>> {
        let layout = Layout::from_size_align(len, ALIGN).ok().filter(|l| l.size() > 0)?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        // SAFETY: the memory is ours until Drop, which deregisters it first;
        // no reference to it exists while reads are outstanding (`bytes`).
        match unsafe { Mr::register(dev, ptr.as_ptr(), len, ibv_access_flags::IBV_ACCESS_LOCAL_WRITE) } {
            Ok(mr) => Some(Ok(LocalBuf { mr: Some(mr), ptr, layout })),
            Err(e) => {
                // SAFETY: allocated above with `layout`, never registered.
                unsafe { dealloc(ptr.as_ptr(), layout) };
                Some(Err(e))
            }
        }
    }

    /// Where a read at `offset` lands, and the key that lets the device write there.
    pub(crate) fn dest(&self, offset: usize) -> (u64, u32) {
        let lkey = self.mr.as_ref().map_or(0, Mr::lkey);
        (self.ptr.as_ptr() as u64 + offset as u64, lkey)
    }

    /// The bytes.
    ///
    /// # Safety
    ///
    /// No read into this buffer may be outstanding (the device would write
    /// under the returned reference).
    pub(crate) unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: `layout.size()` zero-initialised bytes at `ptr`, owned by
        // `self`; the caller guarantees the device is not writing them.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for LocalBuf {
    fn drop(&mut self) {
        drop(self.mr.take());
        // SAFETY: allocated in `new` with `layout`; deregistered just above,
        // so the device no longer writes it.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}
