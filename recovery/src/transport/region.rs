//! What both sides talk about: region descriptors, read requests and their
//! completions. Pure data.

/// The longest single read, in bytes (1 GiB; verbs devices allow 2 GiB).
pub const MAX_READ_LEN: u32 = 1 << 30;

/// What a target publishes about one registered region, with the meaning of
/// `ibv_mr.addr / rkey / length`: remote reads name `addr + offset` and `rkey`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionDesc {
    /// The region's address in the target's address space.
    pub addr: u64,
    /// The key that grants remote read access to it.
    pub rkey: u32,
    /// Its length in bytes.
    pub len: u64,
}

impl RegionDesc {
    /// Whether `[offset, offset + len)` lies inside the region.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len)
    }

    /// Whether the remote address range `[addr, addr + len)` lies inside the
    /// region (what a target checks).
    pub(crate) fn contains_addr(&self, addr: u64, len: u64) -> bool {
        addr.checked_sub(self.addr).is_some_and(|off| self.contains(off, len))
    }
}

/// A local buffer of one initiator, from [`Initiator::alloc_buf`](super::Initiator::alloc_buf).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufId(pub(crate) u32);

impl BufId {
    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }
}

/// One read: `len` bytes at `offset` of a remote region into a local buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    /// Returned in the completion; any value, need not be unique.
    pub wr_id: u64,
    /// The remote region (its `addr` and `rkey` go to the target).
    pub region: RegionDesc,
    /// Offset in the remote region.
    pub offset: u64,
    /// Bytes to read, 1..=[`MAX_READ_LEN`].
    pub len: u32,
    /// Where the bytes land.
    pub buf: BufId,
    /// Offset in the local buffer.
    pub buf_offset: usize,
}

impl ReadRequest {
    /// The remote address the read names (wrapping, so that a nonsense
    /// offset reaches the target and is refused there, as on a device).
    pub(crate) fn remote_addr(&self) -> u64 {
        self.region.addr.wrapping_add(self.offset)
    }
}

/// How a read ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// The bytes are in the local buffer.
    Success,
    /// The target refused the read (unknown or withdrawn key, range outside
    /// the region); the connection is now in the error state.
    AccessError,
    /// Not executed because an earlier read on the connection failed.
    Flushed,
    /// The connection failed before this read completed (peer gone,
    /// timeout, I/O or protocol error); later reads are flushed.
    ConnectionLost,
    /// Another verbs completion error: the `ibv_wc_status` code.
    Device(u32),
}

impl Status {
    /// Whether the read succeeded.
    pub fn is_success(self) -> bool {
        self == Status::Success
    }
}

/// The outcome of one posted read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The request's `wr_id`.
    pub wr_id: u64,
    /// How it ended.
    pub status: Status,
    /// Bytes transferred (the request's length on success, else 0).
    pub len: u32,
    /// CRC-32 (IEEE) of the bytes, computed by the target from its memory
    /// (TCP on success); `None` where the transport has none (verbs: the
    /// NIC reads the memory). Check it against the bytes where they landed.
    pub crc: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_without_overflow() {
        let r = RegionDesc { addr: 0x1000, rkey: 1, len: 0x100 };
        assert!(r.contains(0, 0x100));
        assert!(r.contains(0xff, 1));
        assert!(!r.contains(0xff, 2));
        assert!(!r.contains(u64::MAX, 2));
        assert!(r.contains_addr(0x1000, 0x100));
        assert!(!r.contains_addr(0xfff, 1));
        assert!(!r.contains_addr(0x10ff, 2));
        assert!(!r.contains_addr(u64::MAX, 1));
    }
}
