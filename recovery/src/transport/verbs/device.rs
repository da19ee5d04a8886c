//! An opened RDMA device: its context, port 1, the chosen GID and a
//! protection domain that every registration and queue pair of this
//! process shares.

use std::ffi::CStr;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::{
    ___ibv_query_port, ibv_alloc_pd, ibv_close_device, ibv_context, ibv_dealloc_pd, ibv_device, ibv_device_attr,
    ibv_free_device_list, ibv_get_device_list, ibv_get_device_name, ibv_gid, ibv_open_device, ibv_pd, ibv_port_attr,
    ibv_port_state, ibv_query_device, ibv_query_gid,
};

use crate::transport::{DeviceError, DeviceOptions};

/// The port remem uses.
const PORT: u8 = 1;

/// What a queue pair needs to know about its own port (pure data, so that
/// the attribute building is testable without a device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PortInfo {
    pub(crate) port: u8,
    pub(crate) gid_index: u8,
    pub(crate) gid: [u8; 16],
    pub(crate) lid: u16,
    /// `ibv_mtu` code of the active MTU.
    pub(crate) mtu: u8,
    /// `IBV_LINK_LAYER_*`: 1 InfiniBand, 2 Ethernet (RoCE).
    pub(crate) link_layer: u8,
    /// RDMA READs this device answers at once per queue pair.
    pub(crate) max_dest_rd_atomic: u8,
    /// RDMA READs this device issues at once per queue pair.
    pub(crate) max_rd_atomic: u8,
    /// Largest send queue.
    pub(crate) max_qp_wr: u32,
}

/// An open device with its protection domain. Closed when the last
/// registration and queue pair (which hold an `Arc` of it) are gone.
pub(crate) struct Device {
    name: String,
    port: PortInfo,
    // Dropped in this order: the PD before the context.
    pd: Pd,
    ctx: Ctx,
}

// SAFETY: libibverbs contexts and protection domains may be used from any
// thread ("all verbs are thread safe", ibv_open_device(3) and the rdma-core
// threading notes); `Device` hands out only the raw handles, whose users
// are the verbs calls themselves.
unsafe impl Send for Device {}
// SAFETY: as above; `Device` has no interior state of its own.
unsafe impl Sync for Device {}

struct Ctx(NonNull<ibv_context>);

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: the context was opened by ibv_open_device and everything
        // created from it (the PD, held by `Device` and dropped first; MRs
        // and QPs, which hold the `Device`) is gone.
        unsafe { ibv_close_device(self.0.as_ptr()) };
    }
}

struct Pd(NonNull<ibv_pd>);

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: the PD came from ibv_alloc_pd; the MRs and QPs made in it
        // hold the `Device`, so they are gone.
        unsafe { ibv_dealloc_pd(self.0.as_ptr()) };
    }
}

/// Frees a device list on every path.
struct DeviceList(*mut *mut ibv_device);

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list came from ibv_get_device_list and is freed once;
        // the context opened from one of its devices stays valid (ibv_open_device(3)).
        unsafe { ibv_free_device_list(self.0) };
    }
}

/// What a NULL from `ibv_get_device_list` means, by its errno. Pure.
pub(crate) fn list_error(errno: Option<i32>) -> DeviceError {
    match errno {
        Some(e) if e == rustix::io::Errno::NOSYS.raw_os_error() => DeviceError::NoKernelSupport,
        None | Some(0) => DeviceError::NoDevice { wanted: None, found: Vec::new() },
        Some(e) => DeviceError::Call { what: "ibv_get_device_list", source: io::Error::from_raw_os_error(e) },
    }
}

fn call_err(what: &'static str) -> DeviceError {
    DeviceError::Call { what, source: io::Error::last_os_error() }
}

/// Opens the device `opts` names (or the first one) and returns its name:
/// for an agent or a CLI to check RDMA before serving.
pub fn probe(opts: &DeviceOptions) -> Result<String, DeviceError> {
    Device::open(opts).map(|d| d.name().to_owned())
}

impl Device {
    /// Opens the device and allocates the protection domain.
    pub(crate) fn open(opts: &DeviceOptions) -> Result<Arc<Device>, DeviceError> {
        let mut n: std::ffi::c_int = 0;
        // SAFETY: `n` is a valid out pointer; the list is freed by `DeviceList`.
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(list_error(io::Error::last_os_error().raw_os_error()));
        }
        let list = DeviceList(list);
        let count = usize::try_from(n).unwrap_or(0);
        // SAFETY: ibv_get_device_list returned `n` device pointers at `list`,
        // valid until the list is freed (after this function's last use).
        let devices: &[*mut ibv_device] = unsafe { std::slice::from_raw_parts(list.0, count) };
        let names: Vec<String> = devices
            .iter()
            .map(|&d| {
                // SAFETY: `d` is a device of the live list; the name is a
                // NUL-terminated string owned by it, copied out here.
                unsafe { CStr::from_ptr(ibv_get_device_name(d)) }.to_string_lossy().into_owned()
            })
            .collect();
        let Some(i) = names.iter().position(|n| opts.name.as_ref().is_none_or(|w| w == n)) else {
            return Err(DeviceError::NoDevice { wanted: opts.name.clone(), found: names });
        };
        // SAFETY: `devices[i]` is a device of the live list.
        let ctx = NonNull::new(unsafe { ibv_open_device(devices[i]) }).ok_or_else(|| call_err("ibv_open_device"))?;
        let ctx = Ctx(ctx);
        drop(list);

        // SAFETY: the struct is plain data, for which all-zero bytes are valid.
        let mut dattr: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open; `dattr` is a valid out pointer.
        if unsafe { ibv_query_device(ctx.0.as_ptr(), &mut dattr) } != 0 {
            return Err(call_err("ibv_query_device"));
        }
        // SAFETY: as above, plain data.
        let mut pattr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open; `pattr` is a full-size ibv_port_attr (the
        // reason to call rdma-sys's ___ibv_query_port, not the compat symbol).
        if unsafe { ___ibv_query_port(ctx.0.as_ptr(), PORT, &mut pattr) } != 0 {
            return Err(call_err("ibv_query_port"));
        }
        let name = names[i].clone();
        if pattr.state != ibv_port_state::IBV_PORT_ACTIVE {
            return Err(DeviceError::PortDown { device: name, port: PORT, state: pattr.state });
        }
        // SAFETY: a union of byte arrays and integers: all-zero is valid.
        let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open; `gid` is a valid out pointer.
        if unsafe { ibv_query_gid(ctx.0.as_ptr(), PORT, i32::from(opts.gid_index), &mut gid) } != 0 {
            return Err(call_err("ibv_query_gid (check REMEM_RDMA_GID_INDEX)"));
        }
        // SAFETY: `ctx` is open.
        let pd = Pd(NonNull::new(unsafe { ibv_alloc_pd(ctx.0.as_ptr()) }).ok_or_else(|| call_err("ibv_alloc_pd"))?);
        let clamp_u8 = |v: std::ffi::c_int| v.clamp(1, i32::from(u8::MAX)) as u8;
        let port = PortInfo {
            port: PORT,
            gid_index: opts.gid_index,
            // SAFETY: every bit pattern of the union is a valid byte array.
            gid: unsafe { gid.raw },
            lid: pattr.lid,
            mtu: pattr.active_mtu.clamp(1, 5) as u8,
            link_layer: pattr.link_layer,
            max_dest_rd_atomic: clamp_u8(dattr.max_qp_rd_atom),
            max_rd_atomic: clamp_u8(dattr.max_qp_init_rd_atom),
            max_qp_wr: u32::try_from(dattr.max_qp_wr).unwrap_or(1).max(1),
        };
        Ok(Arc::new(Device { name, port, pd, ctx }))
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn port(&self) -> &PortInfo {
        &self.port
    }

    pub(crate) fn ctx(&self) -> *mut ibv_context {
        self.ctx.0.as_ptr()
    }

    pub(crate) fn pd(&self) -> *mut ibv_pd {
        self.pd.0.as_ptr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_null_device_list_is_explained_by_its_errno() {
        let enosys = rustix::io::Errno::NOSYS.raw_os_error();
        assert!(matches!(list_error(Some(enosys)), DeviceError::NoKernelSupport));
        assert!(matches!(list_error(None), DeviceError::NoDevice { .. }));
        let e = list_error(Some(rustix::io::Errno::NOMEM.raw_os_error()));
        assert!(matches!(e, DeviceError::Call { what: "ibv_get_device_list", .. }), "{e}");
        let msg = DeviceError::NoKernelSupport.to_string();
        assert!(msg.contains("ENOSYS") && msg.contains("rdma_rxe") && msg.contains("TCP transport"), "{msg}");
    }

    /// On this kind of machine (no kernel RDMA) the real call says so.
    #[test]
    fn probe_reports_why_there_is_no_device() {
        match probe(&DeviceOptions::default()) {
            Ok(name) => eprintln!("verbs: device {name} present"),
            Err(e) => {
                assert!(
                    matches!(
                        e,
                        DeviceError::NoKernelSupport | DeviceError::NoDevice { .. } | DeviceError::PortDown { .. }
                    ),
                    "{e}"
                );
                eprintln!("verbs: {e}");
            }
        }
    }
}
