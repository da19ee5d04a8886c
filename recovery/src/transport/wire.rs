//! The TCP transport's data frames, after the handshake. Pure.
//!
//! Both directions are byte streams sealed by the channel (`channel.rs`):
//! the frames below are its plaintext, cut into Noise messages anywhere.
//! The target packs the responses to many requests into each message (up
//! to 65519 bytes of plaintext), so that the AEAD's per-message cost is
//! spread over many pages.
//!
//! ```text
//! request  (initiator → target), 32 bytes:
//!   0  op u8 (1 = READ; there is no other)   1  reserved [3]
//!   4  rkey u32        8  addr u64          16  len u32    20  reserved u32
//!  24  seq u64  (the initiator's count of requests on this connection)
//! response (target → initiator), 16 bytes, then on OK `len` bytes of data
//! and the CRC-32 (IEEE, `crc32fast`) of those bytes, u32:
//!   0  status u8 (0 OK, 1 ACCESS, 2 BAD_REQUEST)   1  reserved [3]
//!   4  len u32         8  seq u64  (the request's)
//! ```
//!
//! The CRC is computed by the target from the copy of the source memory it
//! seals, so it matches the bytes sent even while the memory changes; the
//! initiator hands it to the caller in [`Completion::crc`](super::Completion::crc),
//! which checks the page where it lands (end to end, past every copy).
//!
//! Responses come in request order. After an ACCESS or BAD_REQUEST response
//! the target sends nothing more on the connection (the error state of an
//! RDMA queue pair) and closes it once the initiator hangs up.

/// Request length.
pub(crate) const REQ_LEN: usize = 32;
/// Response header length.
pub(crate) const RESP_LEN: usize = 16;
/// Bytes of the CRC after an OK response's data.
pub(crate) const CRC_LEN: usize = 4;
/// The only operation.
pub(crate) const OP_READ: u8 = 1;

/// Response statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WireStatus {
    /// The data follows.
    Ok = 0,
    /// Unknown key, or the range is outside the region.
    Access = 1,
    /// Unknown operation or bad length.
    BadRequest = 2,
}

impl WireStatus {
    fn from_u8(b: u8) -> Option<WireStatus> {
        match b {
            0 => Some(WireStatus::Ok),
            1 => Some(WireStatus::Access),
            2 => Some(WireStatus::BadRequest),
            _ => None,
        }
    }
}

/// One request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) op: u8,
    pub(crate) rkey: u32,
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) seq: u64,
}

impl Request {
    pub(crate) fn encode(&self) -> [u8; REQ_LEN] {
        let mut b = [0u8; REQ_LEN];
        b[0] = self.op;
        b[4..8].copy_from_slice(&self.rkey.to_le_bytes());
        b[8..16].copy_from_slice(&self.addr.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8; REQ_LEN]) -> Request {
        Request {
            op: b[0],
            rkey: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            addr: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            len: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
            seq: u64::from_le_bytes([b[24], b[25], b[26], b[27], b[28], b[29], b[30], b[31]]),
        }
    }
}

/// One response header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Response {
    pub(crate) status: WireStatus,
    pub(crate) len: u32,
    pub(crate) seq: u64,
}

impl Response {
    pub(crate) fn encode(&self) -> [u8; RESP_LEN] {
        let mut b = [0u8; RESP_LEN];
        b[0] = self.status as u8;
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    /// `None` for an unknown status byte.
    pub(crate) fn decode(b: &[u8; RESP_LEN]) -> Option<Response> {
        Some(Response {
            status: WireStatus::from_u8(b[0])?,
            len: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            seq: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_little_endian() {
        let r = Request { op: OP_READ, rkey: 0x0102_0304, addr: 0x7f00_dead_beef, len: 4096, seq: 1 << 40 };
        let b = r.encode();
        assert_eq!(&b[4..8], &[4, 3, 2, 1]);
        assert_eq!(Request::decode(&b), r);
        let s = Response { status: WireStatus::Access, len: 0, seq: 99 };
        assert_eq!(Response::decode(&s.encode()), Some(s));
        let mut bad = s.encode();
        bad[0] = 7;
        assert_eq!(Response::decode(&bad), None);
    }
}
