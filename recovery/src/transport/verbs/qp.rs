//! Reliable-connection queue pairs, each with its own completion queue, and
//! their RESET → INIT → RTR → RTS transitions. The attributes of each
//! transition are built by pure functions.

use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::{
    ibv_access_flags, ibv_cq, ibv_create_cq, ibv_create_qp, ibv_destroy_cq, ibv_destroy_qp, ibv_modify_qp, ibv_poll_cq,
    ibv_post_send, ibv_qp, ibv_qp_attr, ibv_qp_attr_mask, ibv_qp_init_attr, ibv_qp_state, ibv_qp_type, ibv_send_wr,
    ibv_wc,
};

use super::device::{Device, PortInfo};
use crate::transport::handshake::QpEndpoint;
use crate::transport::token::random;
use crate::transport::DeviceError;

/// `IBV_LINK_LAYER_ETHERNET` (an anonymous enum in verbs.h, not generated).
const LINK_LAYER_ETHERNET: u8 = 2;

fn zeroed_attr() -> ibv_qp_attr {
    // SAFETY: ibv_qp_attr is plain data (integers and structs and unions of
    // integers): all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

/// RESET → INIT on `port`, granting the peer `access` (remote read on the
/// target; nothing on the initiator).
pub(crate) fn init_attr(port: &PortInfo, access: ibv_access_flags) -> (ibv_qp_attr, ibv_qp_attr_mask) {
    let mut a = zeroed_attr();
    a.qp_state = ibv_qp_state::IBV_QPS_INIT;
    a.pkey_index = 0;
    a.port_num = port.port;
    a.qp_access_flags = access.0;
    let m = ibv_qp_attr_mask::IBV_QP_STATE
        | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
        | ibv_qp_attr_mask::IBV_QP_PORT
        | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
    (a, m)
}

/// INIT → RTR towards `remote`: routed by GID on RoCE (or when the peer has
/// no LID), by LID on InfiniBand.
pub(crate) fn rtr_attr(port: &PortInfo, remote: &QpEndpoint) -> (ibv_qp_attr, ibv_qp_attr_mask) {
    let mut a = zeroed_attr();
    a.qp_state = ibv_qp_state::IBV_QPS_RTR;
    a.path_mtu = u32::from(port.mtu.min(remote.mtu));
    a.dest_qp_num = remote.qpn;
    a.rq_psn = remote.psn;
    a.max_dest_rd_atomic = port.max_dest_rd_atomic;
    a.min_rnr_timer = 12;
    a.ah_attr.dlid = remote.lid;
    a.ah_attr.sl = 0;
    a.ah_attr.src_path_bits = 0;
    a.ah_attr.port_num = port.port;
    if port.link_layer == LINK_LAYER_ETHERNET || remote.lid == 0 {
        a.ah_attr.is_global = 1;
        a.ah_attr.grh.dgid.raw = remote.gid;
        a.ah_attr.grh.sgid_index = port.gid_index;
        a.ah_attr.grh.hop_limit = 64;
    }
    let m = ibv_qp_attr_mask::IBV_QP_STATE
        | ibv_qp_attr_mask::IBV_QP_AV
        | ibv_qp_attr_mask::IBV_QP_PATH_MTU
        | ibv_qp_attr_mask::IBV_QP_DEST_QPN
        | ibv_qp_attr_mask::IBV_QP_RQ_PSN
        | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
        | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
    (a, m)
}

/// RTR → RTS, sending from `psn`. Timeout 14 (≈ 67 ms) × 7 retries: a gone
/// peer fails reads in about half a second.
pub(crate) fn rts_attr(port: &PortInfo, psn: u32) -> (ibv_qp_attr, ibv_qp_attr_mask) {
    let mut a = zeroed_attr();
    a.qp_state = ibv_qp_state::IBV_QPS_RTS;
    a.timeout = 14;
    a.retry_cnt = 7;
    a.rnr_retry = 7;
    a.sq_psn = psn;
    a.max_rd_atomic = port.max_rd_atomic;
    let m = ibv_qp_attr_mask::IBV_QP_STATE
        | ibv_qp_attr_mask::IBV_QP_TIMEOUT
        | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
        | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
        | ibv_qp_attr_mask::IBV_QP_SQ_PSN
        | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
    (a, m)
}

/// An RC queue pair and its completion queue; destroyed on drop.
pub(crate) struct Qp {
    // Destroyed in this order: the QP before its CQ.
    qp: NonNull<ibv_qp>,
    cq: NonNull<ibv_cq>,
    psn: u32,
    depth: u32,
    dev: Arc<Device>,
}

// SAFETY: verbs on a QP and CQ may be called from any thread; `Qp` is used
// through `&self`/`&mut self` of one owner at a time.
unsafe impl Send for Qp {}

impl Qp {
    /// A queue pair whose send queue holds `depth` requests (capped by the device).
    pub(crate) fn new(dev: &Arc<Device>, depth: u32) -> Result<Qp, DeviceError> {
        let depth = depth.clamp(1, dev.port().max_qp_wr);
        let call_err = |what| DeviceError::Call { what, source: std::io::Error::last_os_error() };
        // SAFETY: the context is open (held by `dev`); no channel, no context pointer.
        let cq = unsafe { ibv_create_cq(dev.ctx(), depth as i32, std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        let cq = NonNull::new(cq).ok_or_else(|| call_err("ibv_create_cq"))?;
        // SAFETY: plain data; all-zero is valid (null pointers, zero caps).
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.as_ptr();
        init.recv_cq = cq.as_ptr();
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0; // every READ is signalled explicitly
        init.cap.max_send_wr = depth;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: the PD is alive; `init` names a live CQ.
        let qp = match NonNull::new(unsafe { ibv_create_qp(dev.pd(), &mut init) }) {
            Some(qp) => qp,
            None => {
                let e = call_err("ibv_create_qp");
                // SAFETY: the CQ was created above and nothing uses it.
                unsafe { ibv_destroy_cq(cq.as_ptr()) };
                return Err(e);
            }
        };
        let mut psn = [0u8; 4];
        random(&mut psn).map_err(|e| DeviceError::Call { what: "PSN", source: std::io::Error::other(e) })?;
        let psn = u32::from_le_bytes(psn) & 0xff_ffff;
        Ok(Qp { qp, cq, psn, depth, dev: dev.clone() })
    }

    /// The send queue depth.
    pub(crate) fn depth(&self) -> u32 {
        self.depth
    }

    /// What the peer needs to connect to this queue pair.
    pub(crate) fn endpoint(&self) -> QpEndpoint {
        let p = self.dev.port();
        // SAFETY: the QP is alive; `qp_num` is set by ibv_create_qp and never changes.
        let qpn = unsafe { self.qp.as_ref().qp_num };
        QpEndpoint { qpn, psn: self.psn, lid: p.lid, mtu: p.mtu, gid: p.gid }
    }

    /// RESET → INIT → RTR → RTS towards `remote`.
    pub(crate) fn connect(&self, remote: &QpEndpoint, access: ibv_access_flags) -> Result<(), DeviceError> {
        let p = self.dev.port();
        let steps = [
            ("ibv_modify_qp to INIT", init_attr(p, access)),
            ("ibv_modify_qp to RTR", rtr_attr(p, remote)),
            ("ibv_modify_qp to RTS", rts_attr(p, self.psn)),
        ];
        for (what, (mut attr, mask)) in steps {
            // SAFETY: the QP is alive; `attr` is a valid attribute struct for `mask`.
            let rc = unsafe { ibv_modify_qp(self.qp.as_ptr(), &mut attr, mask.0 as i32) };
            if rc != 0 {
                return Err(DeviceError::Call { what, source: std::io::Error::from_raw_os_error(rc) });
            }
        }
        Ok(())
    }

    /// Posts a chain of work requests; on failure, the one refused (those
    /// before it were posted).
    ///
    /// # Safety
    ///
    /// `head` must start a valid chain (as `WrBatch::build` makes) whose
    /// scatter-gather entries name memory registered in this device's PD
    /// that stays registered, and is not referenced, until each request's
    /// completion has been polled.
    pub(crate) unsafe fn post(&self, head: *mut ibv_send_wr) -> Result<(), (*mut ibv_send_wr, DeviceError)> {
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the QP is alive; the caller vouches for the chain.
        let rc = unsafe { ibv_post_send(self.qp.as_ptr(), head, &mut bad) };
        if rc == 0 {
            return Ok(());
        }
        Err((bad, DeviceError::Call { what: "ibv_post_send", source: std::io::Error::from_raw_os_error(rc) }))
    }

    /// Takes up to `wcs.len()` completions off the CQ, without blocking.
    pub(crate) fn poll(&self, wcs: &mut [ibv_wc]) -> Result<usize, DeviceError> {
        let n = wcs.len().min(i32::MAX as usize) as i32;
        // SAFETY: the CQ is alive; `wcs` has room for `n` entries.
        let got = unsafe { ibv_poll_cq(self.cq.as_ptr(), n, wcs.as_mut_ptr()) };
        usize::try_from(got).map_err(|_| DeviceError::Call {
            what: "ibv_poll_cq",
            source: std::io::Error::other(format!("returned {got}")),
        })
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once, the QP before its CQ.
        // Destroying the QP stops the device from touching the memory its
        // requests named.
        unsafe {
            ibv_destroy_qp(self.qp.as_ptr());
            ibv_destroy_cq(self.cq.as_ptr());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(link_layer: u8) -> PortInfo {
        PortInfo {
            port: 1,
            gid_index: 3,
            gid: [1; 16],
            lid: 0x11,
            mtu: 5,
            link_layer,
            max_dest_rd_atomic: 16,
            max_rd_atomic: 8,
            max_qp_wr: 1 << 14,
        }
    }

    fn remote(lid: u16) -> QpEndpoint {
        QpEndpoint { qpn: 0x42, psn: 0x1234, lid, mtu: 3, gid: [9; 16] }
    }

    #[test]
    fn init_grants_only_the_access_asked_for() {
        let (a, m) = init_attr(&port(1), ibv_access_flags::IBV_ACCESS_REMOTE_READ);
        assert_eq!(a.qp_state, ibv_qp_state::IBV_QPS_INIT);
        assert_eq!(a.qp_access_flags, ibv_access_flags::IBV_ACCESS_REMOTE_READ.0);
        assert_eq!(a.port_num, 1);
        assert_eq!(m.0 & ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS.0, ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS.0);
        let (a, _) = init_attr(&port(1), ibv_access_flags(0));
        assert_eq!(a.qp_access_flags, 0, "the initiator grants no remote access");
    }

    #[test]
    fn rtr_routes_by_lid_on_infiniband_and_by_gid_on_roce() {
        let (ib, m) = rtr_attr(&port(1), &remote(0x22));
        assert_eq!((ib.dest_qp_num, ib.rq_psn, ib.ah_attr.dlid), (0x42, 0x1234, 0x22));
        assert_eq!(ib.ah_attr.is_global, 0);
        assert_eq!(ib.path_mtu, 3, "the smaller of the two MTUs");
        assert_eq!(ib.max_dest_rd_atomic, 16);
        assert_eq!(m.0 & ibv_qp_attr_mask::IBV_QP_AV.0, ibv_qp_attr_mask::IBV_QP_AV.0);
        let (roce, _) = rtr_attr(&port(LINK_LAYER_ETHERNET), &remote(0));
        assert_eq!(roce.ah_attr.is_global, 1);
        // SAFETY: rtr_attr wrote the `raw` member of the GID union.
        assert_eq!(unsafe { roce.ah_attr.grh.dgid.raw }, [9; 16]);
        assert_eq!((roce.ah_attr.grh.sgid_index, roce.ah_attr.grh.hop_limit), (3, 64));
        let (no_lid, _) = rtr_attr(&port(1), &remote(0));
        assert_eq!(no_lid.ah_attr.is_global, 1);
    }

    #[test]
    fn rts_sends_from_our_psn() {
        let (a, m) = rts_attr(&port(1), 0xabc);
        assert_eq!((a.qp_state, a.sq_psn, a.max_rd_atomic), (ibv_qp_state::IBV_QPS_RTS, 0xabc, 8));
        assert_eq!((a.timeout, a.retry_cnt, a.rnr_retry), (14, 7, 7));
        assert_eq!(m.0 & ibv_qp_attr_mask::IBV_QP_SQ_PSN.0, ibv_qp_attr_mask::IBV_QP_SQ_PSN.0);
    }
}
