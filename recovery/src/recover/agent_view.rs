//! What recovery learns from the agent before it changes anything: the
//! info block, the region table, the dirty lists and the page CRCs. Every
//! value the agent sends is checked against the baseline (UUID, page count)
//! and against the regions it announced before it is used: a bad or hostile
//! answer is a [`RecoverError::Protocol`], never a panic, and it comes
//! before the old owner is fenced.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{RecoverError, RecoverOptions};
use crate::agent::{dir, info, layout};
use crate::transport::{self, ConnectError, ConnectOptions, Initiator, Kind, ReadRequest, RegionDesc, Status, Token};

/// Page size.
const PAGE: u64 = 4096;

/// A connection that failed: unreachable (retry, or with permission recover
/// from the baseline alone) or refused (authentication, protocol: never
/// treated as unreachable).
#[derive(Debug)]
pub(super) enum ConnectFail {
    /// The agent could not be reached (connection or handshake I/O).
    Unreachable(String),
    /// The agent answered, and refused us or broke the protocol.
    Refused(String),
}

/// Connects to the agent at `addr`.
pub(super) fn connect(kind: Kind, token: Option<&Token>, addr: SocketAddr) -> Result<Box<dyn Initiator>, ConnectFail> {
    let token = token.cloned().ok_or_else(|| ConnectFail::Refused("no token".into()))?;
    transport::connect(kind, &ConnectOptions::new(addr, token)).map_err(|e| match e {
        ConnectError::Connect { .. } | ConnectError::Io { .. } => ConnectFail::Unreachable(e.to_string()),
        e => ConnectFail::Refused(e.to_string()),
    })
}

impl ConnectFail {
    /// The error `recover` reports for it.
    pub(super) fn into_error(self, addr: SocketAddr) -> RecoverError {
        match self {
            ConnectFail::Unreachable(reason) => RecoverError::AgentUnreachable { addr, reason },
            ConnectFail::Refused(reason) => RecoverError::AgentRefused { addr, reason },
        }
    }
}

/// Reads `len` bytes at `offset` of `region`, one read of at most
/// [`transport::MAX_READ_LEN`] outstanding at a time.
pub(super) fn read_bytes(
    init: &mut dyn Initiator,
    region: RegionDesc,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, String> {
    if !region.contains(offset, len as u64) {
        return Err(format!("{len} bytes at {offset} lie outside the region of {} bytes", region.len));
    }
    let chunk = (transport::MAX_READ_LEN as usize).min(len.max(1));
    let buf = init.alloc_buf(chunk).map_err(|e| e.to_string())?;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        let n = (len - data.len()).min(chunk);
        let req =
            ReadRequest { wr_id: 0, region, offset: offset + data.len() as u64, len: n as u32, buf, buf_offset: 0 };
        init.post(&[req]).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let got = init.wait(&mut out, 1, Duration::from_secs(30)).map_err(|e| e.to_string())?;
        match out.first() {
            Some(c) if got >= 1 && c.status == Status::Success && c.len as usize == n => {}
            Some(c) => return Err(format!("read failed: {:?}", c.status)),
            None => return Err("the agent did not answer within 30 s".into()),
        }
        data.extend_from_slice(&init.buf(buf).map_err(|e| e.to_string())?[..n]);
    }
    Ok(data)
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, String> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])))
        .ok_or_else(|| format!("no u64 at {at}"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap_or([0; 4])))
        .ok_or_else(|| format!("no u32 at {at}"))
}

/// What the agent serves about the heap, validated.
pub(super) struct AgentView {
    pub(super) init: Box<dyn Initiator>,
    pub(super) heap: RegionDesc,
    /// Pages that may be newer than the baseline (sorted).
    pub(super) pages: Vec<u64>,
    /// CRC32 of every page at sealing (none from a hung owner: never sealed).
    pub(super) crcs: Option<Vec<u32>>,
    /// Pages of the heap.
    pub(super) npages: u64,
    /// The owner was found hung (its lease expired): the lists were not sealed.
    pub(super) hung: bool,
    /// Nothing is pulled although the owner's memory may be newer (fast mode,
    /// hung owner, data loss allowed): the baseline alone is used.
    pub(super) lossy: bool,
    /// BLAKE3 of the image at sealing, when the agent publishes one.
    pub(super) digest: Option<[u8; 32]>,
    /// The seal was still in progress (state SEALING, a lazy recovery): the
    /// lists, bits and CRCs cover pages below `cursor` only, and every page
    /// from `cursor` on may be newer than the baseline.
    pub(super) sealing: Option<Sealing>,
}

/// Where a seal in progress stood, and where to follow it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sealing {
    /// Pages `[0, cursor)` are covered by the seal.
    pub(super) cursor: u64,
    /// The directory region and the offset of the heap's info block in it.
    pub(super) directory: RegionDesc,
    pub(super) slot_off: u64,
    /// The slot's `assigned` stamp (a change means the slot was reused).
    pub(super) assigned: u64,
    /// The agent's CRC table and sealed bitmap.
    pub(super) crc: RegionDesc,
    pub(super) sealed: RegionDesc,
}

/// The owner's tracking mode, from its control region header.
const MODE_PRECISE: u32 = 1;

/// Finds the agent's directory region: the one that starts with its magic.
fn find_directory(init: &mut dyn Initiator) -> Result<Option<RegionDesc>, String> {
    let candidates: Vec<RegionDesc> = init
        .regions()
        .iter()
        .copied()
        .filter(|r| r.len >= dir::len(1) as u64 && r.len <= dir::len(dir::MAX_SLOTS) as u64 && r.len % PAGE == 0)
        .collect();
    for r in candidates {
        if read_bytes(init, r, 0, 8)?.get(..8) == Some(&dir::MAGIC_BYTES[..]) {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

/// The info block of heap `uuid` in a directory, and its offset, if a slot holds it.
fn find_slot(d: &[u8], uuid: [u8; 16]) -> Option<(usize, &[u8])> {
    let slots = layout::u32_at(d, dir::SLOTS)? as usize;
    (0..slots.min(dir::MAX_SLOTS))
        .filter_map(|s| {
            let off = dir::slot_offset(s);
            d.get(off..off + info::LEN).map(|b| (off, b))
        })
        .find(|(_, b)| {
            b.get(..8) == Some(&info::MAGIC_BYTES[..])
                && layout::u32_at(b, info::STATE) != Some(info::FREE)
                && b.get(info::UUID..info::UUID + 16) == Some(&uuid[..])
        })
}

/// Connects, finds the heap of `uuid` in the agent's directory (see
/// `crate::agent`), waits until its owner is gone and the lists are sealed,
/// and reads and checks everything recovery needs, for a heap of `npages`
/// pages (from the baseline). Changes nothing anywhere.
///
/// An owner whose lease has expired (see `remem_alloc`'s `control.rs`: the
/// lease word did not move across two lease periods) is hung, not running
/// (failure F2): in precise mode its lists are complete at every instant,
/// so the view is taken from them at once, without the agent's seal (and so
/// without page CRCs); in fast mode pages written since the last harvest are
/// known only to the hung process, so recovery waits for a seal until
/// `wait_sealed`, then refuses ([`RecoverError::OwnerHung`]) unless
/// `allow_data_loss`.
/// What [`agent_view`] needs of the recovery's options (an owned copy:
/// the view is read on a thread of its own while the baseline is opened,
/// and that thread is not waited for when the baseline fails), and a flag
/// that tells it to give up.
#[derive(Clone)]
pub(super) struct ViewOptions {
    pub kind: Kind,
    pub token: Option<Token>,
    pub wait_sealed: Duration,
    pub lazy: bool,
    pub allow_data_loss: bool,
    /// Set when the recovery failed otherwise: the view is no longer
    /// wanted, and the polling and the lease check end at their next look.
    pub cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ViewOptions {
    pub(super) fn of(o: &RecoverOptions) -> Self {
        ViewOptions {
            kind: o.kind,
            token: o.token.clone(),
            wait_sealed: o.wait_sealed,
            lazy: o.lazy,
            allow_data_loss: o.allow_data_loss,
            cancel: Default::default(),
        }
    }

    /// The view is no longer wanted.
    pub(super) fn cancelled(&self) -> bool {
        self.cancel.load(std::sync::atomic::Ordering::Acquire)
    }
}

pub(super) fn agent_view(
    opts: &ViewOptions,
    addr: SocketAddr,
    uuid: [u8; 16],
    npages: u64,
) -> Result<AgentView, RecoverError> {
    let proto = |m: String| RecoverError::Protocol(m);
    let deadline = Instant::now() + opts.wait_sealed;
    // `Some(mode)` once the owner's lease was found expired.
    let mut hung: Option<Option<u32>> = None;
    loop {
        if opts.cancelled() {
            return Err(RecoverError::AgentUnreachable {
                addr,
                reason: "no longer asked (the recovery failed)".into(),
            });
        }
        let mut init = connect(opts.kind, opts.token.as_ref(), addr).map_err(|f| f.into_error(addr))?;
        let unreachable = |reason: String| RecoverError::AgentUnreachable { addr, reason };
        let dreg = find_directory(&mut *init)
            .map_err(unreachable)?
            .ok_or_else(|| proto("the agent announced no directory region".into()))?;
        let d = read_bytes(&mut *init, dreg, 0, dreg.len as usize).map_err(unreachable)?;
        let Some((slot_off, block)) = find_slot(&d, uuid).map(|(o, b)| (o, b.to_vec())) else {
            if Instant::now() >= deadline {
                return Err(proto(format!("the agent holds no heap {}", remem_alloc::format::uuid_string(&uuid))));
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let state = u32_at(&block, info::STATE).map_err(proto)?;
        if state == info::SEALED || state == info::CLOSED {
            return read_view(init, &block, npages, false).map_err(proto);
        }
        if state == info::SEALING && opts.lazy && opts.kind == Kind::Tcp {
            // The owner is gone and its memory frozen: a lazy recovery
            // starts now and follows the seal (see `AgentSource`). Only
            // over TCP, whose responses carry a CRC from the agent's memory
            // for the pages the seal has not covered yet (RDMA reads carry
            // none: over verbs a lazy recovery waits for the seal).
            let mut v = read_view(init, &block, npages, false).map_err(proto)?;
            if let Some(s) = v.sealing.as_mut() {
                (s.directory, s.slot_off) = (dreg, slot_off as u64);
            }
            return Ok(v);
        }
        if state == info::RUNNING && hung.is_none() {
            hung = Some(lease_expired(&mut *init, &block, &opts.cancel).map_err(proto)?);
        }
        if let Some(Some(mode)) = hung {
            if mode == MODE_PRECISE {
                return read_view(init, &block, npages, true).map_err(proto);
            }
        }
        if Instant::now() >= deadline {
            return match (state, hung) {
                (info::RUNNING, Some(Some(_))) if opts.allow_data_loss => {
                    // Its lists miss the pages written since the last harvest: laying
                    // the others over the baseline could tear transactions, so the
                    // baseline alone (consistent as of its last commit) is used.
                    log::warn!("remem recover: the owner is hung in fast mode: recovering from the baseline alone");
                    let mut v = read_view(init, &block, npages, true).map_err(proto)?;
                    v.pages.clear();
                    v.lossy = true;
                    Ok(v)
                }
                (info::RUNNING, Some(Some(_))) => Err(RecoverError::OwnerHung),
                (info::RUNNING, _) => {
                    Err(RecoverError::OwnerAlive { pid: u64_at(&block, info::OWNER_PID).map_err(proto)? })
                }
                _ => Err(proto("the agent did not finish sealing in time".into())),
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads the owner's lease twice, more than two lease periods apart:
/// `Some(tracking mode)` when it did not move (the owner is hung or dead),
/// `None` when it did (or the owner keeps no lease).
fn lease_expired(
    init: &mut dyn Initiator,
    block: &[u8],
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<Option<u32>, String> {
    let control = layout::region_desc(block, info::CONTROL).ok_or("the info block has no control region")?;
    let read = |init: &mut dyn Initiator| -> Result<(u64, u64, u32), String> {
        let h = read_bytes(init, control, 0, PAGE as usize)?;
        Ok((
            u64_at(&h, remem_alloc::ctl::LEASE)?,
            u64_at(&h, remem_alloc::ctl::LEASE_PERIOD_MS)?,
            u32_at(&h, remem_alloc::ctl::MODE)?,
        ))
    };
    let (first, period_ms, mode) = read(init)?;
    if period_ms == 0 {
        return Ok(None);
    }
    if period_ms > 60_000 {
        return Err(format!("the owner's lease period is {period_ms} ms (at most 60 s)"));
    }
    // Two periods and a little, looking at `cancel` now and then.
    let until = Instant::now() + Duration::from_millis(2 * period_ms + 50);
    while let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
        if cancel.load(std::sync::atomic::Ordering::Acquire) {
            return Err("no longer asked (the recovery failed)".into());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
    let (second, _, _) = read(init)?;
    Ok((first == second).then_some(mode))
}

/// Reads the lists and CRCs named by a sealed info block, checking every value.
fn read_view(mut init: Box<dyn Initiator>, block: &[u8], npages: u64, hung: bool) -> Result<AgentView, String> {
    let agent_npages = u64_at(block, info::NPAGES)?;
    if agent_npages != npages {
        return Err(format!("the agent's heap has {agent_npages} pages, the baseline's {npages}"));
    }
    let state = u32_at(block, info::STATE)?;
    let digest = (u64_at(block, info::DIGEST_READY)? == 1).then(|| {
        let mut d = [0u8; 32];
        d.copy_from_slice(&block[info::DIGEST..info::DIGEST + 32]);
        d
    });
    if state == info::CLOSED {
        // Closed cleanly, or superseded: everything is in the baseline.
        let heap = RegionDesc { addr: 0, rkey: 0, len: 0 };
        let crcs = Some(Vec::new());
        let (hung, lossy, digest, sealing) = (false, false, None, None);
        return Ok(AgentView { init, heap, pages: Vec::new(), crcs, npages, hung, lossy, digest, sealing });
    }
    let find = |n: usize| layout::region_desc(block, n).ok_or_else(|| format!("the info block has no region {n}"));
    let (heap, control, crc, sealed) =
        (find(info::HEAP)?, find(info::CONTROL)?, find(info::CRC)?, find(info::SEALED_MAP)?);
    let words = npages.div_ceil(64);
    let set_bytes = words.checked_mul(8).ok_or("page count overflows")?;
    if heap.len != npages.checked_mul(PAGE).ok_or("page count overflows")? {
        return Err(format!("the heap region is {} bytes, the heap {npages} pages", heap.len));
    }
    // The control region: a header page and two sets of `words` words.
    let max_control = PAGE + 2 * set_bytes.next_multiple_of(PAGE);
    if control.len < PAGE || control.len > max_control {
        return Err(format!("the control region is {} bytes (expected {PAGE}..={max_control})", control.len));
    }
    let ctl = read_bytes(&mut *init, control, 0, control.len as usize)?;
    let set = |field: usize| -> Result<std::ops::Range<usize>, String> {
        let off = u64_at(&ctl, field)?;
        let end = off.checked_add(set_bytes).filter(|&e| e <= ctl.len() as u64 && off >= PAGE);
        let end = end.ok_or_else(|| format!("a dirty set at {off} lies outside the control region"))?;
        Ok(off as usize..end as usize)
    };
    let (cur, clo) = (set(remem_alloc::ctl::CURRENT_OFF)?, set(remem_alloc::ctl::CLOSING_OFF)?);
    if crc.len < npages * 4 || sealed.len < set_bytes {
        return Err(format!("the crc region ({} bytes) or sealed bitmap ({} bytes) is too short", crc.len, sealed.len));
    }
    // Sealed so far: all of it, unless the seal is in progress (then its
    // cursor, read before the bits and CRCs it covers, which the agent
    // publishes before advancing it).
    let sealing = state == info::SEALING && !hung;
    let cursor = if sealing { u64_at(block, info::SEAL_CURSOR)? } else { npages };
    if cursor > npages {
        return Err(format!("the seal cursor {cursor} is beyond the heap's {npages} pages"));
    }
    let sealed_bits = read_bytes(&mut *init, sealed, 0, (cursor.div_ceil(64) * 8) as usize)?;
    let crc_bytes = read_bytes(&mut *init, crc, 0, (cursor * 4) as usize)?;
    let mut pages = Vec::new();
    let (cur, clo) = (&ctl[cur], &ctl[clo]);
    for w in 0..words as usize {
        let first = w as u64 * 64;
        let sealed_word = match cursor.saturating_sub(first) {
            0 => 0,
            k if k < 64 => u64_at(&sealed_bits, 8 * w)? & ((1u64 << k) - 1),
            _ => u64_at(&sealed_bits, 8 * w)?,
        };
        let mut bits = u64_at(cur, 8 * w)? | u64_at(clo, 8 * w)? | sealed_word;
        while bits != 0 {
            let p = w as u64 * 64 + u64::from(bits.trailing_zeros());
            if p < npages {
                pages.push(p);
            }
            bits &= bits - 1;
        }
    }
    // A hung owner's lists were never sealed: no CRCs.
    let crcs =
        (!hung).then(|| crc_bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect());
    let sealing = sealing.then(|| Sealing {
        cursor,
        directory: RegionDesc { addr: 0, rkey: 0, len: 0 },
        slot_off: 0,
        assigned: u64_at(block, info::ASSIGNED).unwrap_or(0),
        crc,
        sealed,
    });
    Ok(AgentView { init, heap, pages, crcs, npages, digest, hung, lossy: false, sealing })
}
