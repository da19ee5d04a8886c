//! The heaps an agent holds, keyed by UUID, each in a slot of the directory
//! and bound to the connection that registered it.
//!
//! Rules (enforced under one lock, [`Shared::table`]):
//! * a UUID is in at most one slot;
//! * a heap whose owner is connected cannot be registered again (a second
//!   live registration is refused) nor re-attached;
//! * a heap whose owner is gone (SEALING, SEALED) still holds pages newer
//!   than the baseline: a new registration of its UUID is refused unless
//!   the baseline shows that a recovery superseded it (a newer generation
//!   committed a newer epoch), and only its registrant's user may re-attach it;
//! * the end of a connection affects only the heap that connection
//!   registered;
//! * a heap that leaves (closed cleanly, superseded, replaced) has its
//!   regions withdrawn and its memfds closed at once.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use remem_alloc::format::uuid_string;

use super::error::AgentError;
use super::layout::{dir, info};
use super::socket::Policy;
use super::validate::{newest_superblock, Checked};
use crate::sys::ReadMap;
use crate::transport::{RegionDesc, SharedBytes, SourceMemory, Target};

/// Who owns a hosted heap now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// The connection with this id (a database, or a re-attaching one).
    Conn(u64),
    /// The owner is gone.
    Gone,
}

/// The memory held for one heap.
pub(crate) struct Held {
    pub heap_fd: OwnedFd,
    /// The true contents (sealing reads these).
    pub heap: Arc<ReadMap>,
    pub control: Arc<ReadMap>,
    pub crc: Arc<SharedBytes>,
    pub sealed: Arc<SharedBytes>,
    pub rkeys: Vec<u32>,
    pub npages: u64,
    pub mode: u32,
    pub sets: (u64, u64),
    pub baseline: File,
    pub generation: u64,
}

/// One slot of the table.
pub(crate) struct Hosted {
    pub uuid: [u8; 16],
    pub owner: Owner,
    /// The registrant's uid: only this user may re-attach.
    pub uid: u32,
    pub pid: u32,
    pub state: u32,
    /// `None` once the heap left (CLOSED).
    pub held: Option<Held>,
    /// Tells this heap's background thread (seal, then watch) to stop.
    pub stop: Arc<AtomicBool>,
    /// The directory's change count when the slot was assigned.
    pub assigned: u64,
    /// The baseline's epoch when the owner left (`u64::MAX` while it runs).
    pub dead_epoch: u64,
}

/// The table of slots.
#[derive(Default)]
pub(crate) struct Table {
    pub slots: Vec<Option<Hosted>>,
    /// The slot registered most recently.
    pub latest: Option<usize>,
    pub changes: u64,
}

/// What the agent's threads share.
pub(crate) struct Shared {
    pub target: Arc<dyn Target>,
    /// The directory region (header + one info block per slot).
    pub dir: Arc<SharedBytes>,
    pub table: Mutex<Table>,
    pub changed: Condvar,
    pub policy: Policy,
    /// Compute a BLAKE3 of the image when sealing (off by default).
    pub digest: bool,
    /// Test hook: pages served damaged.
    pub damaged: Vec<u64>,
    /// Test hook: pause after each sealed chunk.
    pub seal_pause: std::time::Duration,
    /// The agent was dropped.
    pub stopping: AtomicBool,
}

impl Shared {
    /// Writes `data` at `field` of slot `slot`'s info block.
    pub(crate) fn put(&self, slot: usize, field: usize, data: &[u8]) {
        self.dir.write(dir::slot_offset(slot) + field, data);
    }

    pub(crate) fn put_u64(&self, slot: usize, field: usize, v: u64) {
        self.put(slot, field, &v.to_le_bytes());
    }

    /// Sets a slot's state (in the table and the info block) and wakes waiters.
    pub(crate) fn set_state(&self, t: &mut Table, slot: usize, state: u32) {
        if let Some(h) = t.slots[slot].as_mut() {
            h.state = state;
        }
        self.put(slot, info::STATE, &state.to_le_bytes());
        self.changed.notify_all();
    }

    /// Withdraws a heap's regions and closes its memfds; stops its thread.
    pub(crate) fn release(&self, h: &mut Hosted) {
        h.stop.store(true, Ordering::SeqCst);
        if let Some(held) = h.held.take() {
            for k in held.rkeys {
                let _ = self.target.deregister(k);
            }
        }
    }

    fn bump(&self, t: &mut Table) -> u64 {
        t.changes += 1;
        self.dir.write(dir::CHANGES, &t.changes.to_le_bytes());
        t.changes
    }

    /// Clears a slot's info block (state FREE).
    fn clear_slot(&self, slot: usize) {
        let mut block = vec![0u8; info::LEN];
        block[info::MAGIC..info::MAGIC + 8].copy_from_slice(&info::MAGIC_BYTES);
        block[info::VERSION..info::VERSION + 4].copy_from_slice(&info::CURRENT_VERSION.to_le_bytes());
        self.dir.write(dir::slot_offset(slot), &block);
    }

    /// Writes an empty directory of `slots` slots.
    pub(crate) fn init_dir(&self, slots: usize) {
        self.dir.write(dir::MAGIC, &dir::MAGIC_BYTES);
        self.dir.write(dir::VERSION, &dir::CURRENT_VERSION.to_le_bytes());
        self.dir.write(dir::SLOTS, &(slots as u32).to_le_bytes());
        for s in 0..slots {
            self.clear_slot(s);
        }
    }
}

/// Whether the baseline shows that a recovery elsewhere took over from the
/// owner that registered with `generation`: a newer generation, and a
/// commit since the fence (an epoch newer than the one the baseline had
/// when the owner died, `dead_epoch`).
pub(crate) fn superseded(baseline: &File, generation: u64, dead_epoch: u64) -> bool {
    newest_superblock(baseline).is_ok_and(|sb| sb.generation > generation && sb.epoch > dead_epoch)
}

/// A registration request, checked, with its maps made.
pub(crate) struct NewHeap {
    pub checked: Checked,
    pub heap_fd: OwnedFd,
    pub heap: Arc<ReadMap>,
    pub served: Arc<dyn SourceMemory>,
    pub control: Arc<ReadMap>,
    pub baseline: File,
    pub generation: u64,
    pub uid: u32,
    pub pid: u32,
}

/// Hosts `new` for connection `conn`: finds its slot (see the module rules),
/// registers its regions, fills the info block, sets RUNNING.
pub(crate) fn host(sh: &Shared, conn: u64, new: NewHeap) -> Result<usize, AgentError> {
    let uuid = new.checked.header.uuid;
    let npages = new.checked.header.layout.npages();
    let words = npages.div_ceil(64) as usize;
    let crc = Arc::new(SharedBytes::zeroed(npages as usize * 4));
    let sealed = Arc::new(SharedBytes::zeroed(words * 8));
    let mut t = sh.table.lock();
    let existing = t.slots.iter().position(|s| s.as_ref().is_some_and(|h| h.uuid == uuid));
    let slot = match existing {
        Some(i) => {
            let h = t.slots[i].as_ref().expect("found");
            match h.owner {
                Owner::Conn(c) if c == conn => {}
                Owner::Conn(_) => {
                    return Err(AgentError::Refused(format!(
                        "heap {} is already registered by a live process (pid {}); a heap has one owner",
                        uuid_string(&uuid),
                        h.pid
                    )));
                }
                Owner::Gone => {
                    if let Some(held) = &h.held {
                        if !superseded(&held.baseline, held.generation, h.dead_epoch) {
                            return Err(AgentError::Refused(format!(
                                "the agent holds the memory of heap {} from its owner (pid {}) that died with pages \
                                 newer than the baseline: re-attach it (remem reattach) or recover it first",
                                uuid_string(&uuid),
                                h.pid
                            )));
                        }
                    }
                }
            }
            i
        }
        None => match t.slots.iter().position(Option::is_none) {
            Some(i) => i,
            // Reuse the slot of a heap that left.
            None => t.slots.iter().position(|s| s.as_ref().is_some_and(|h| h.held.is_none())).ok_or_else(|| {
                AgentError::Refused(format!("the agent already holds {} heaps, its maximum", t.slots.len()))
            })?,
        },
    };
    // Register the new regions before withdrawing anything.
    let mems: [Arc<dyn SourceMemory>; 4] = [new.served.clone(), new.control.clone(), crc.clone(), sealed.clone()];
    let mut descs: Vec<RegionDesc> = Vec::with_capacity(4);
    for m in mems {
        match sh.target.register(m) {
            Ok(d) => descs.push(d),
            Err(e) => {
                for d in &descs {
                    let _ = sh.target.deregister(d.rkey);
                }
                return Err(e.into());
            }
        }
    }
    if let Some(mut old) = t.slots[slot].take() {
        sh.release(&mut old);
    }
    let assigned = sh.bump(&mut t);
    sh.clear_slot(slot);
    let hd = &new.checked.header;
    sh.put(slot, info::UUID, &uuid);
    sh.put_u64(slot, info::SIZE, hd.layout.size);
    sh.put_u64(slot, info::BASE, hd.base);
    sh.put_u64(slot, info::NPAGES, npages);
    sh.put(slot, info::MODE, &new.checked.mode.to_le_bytes());
    for (n, d) in descs.iter().enumerate() {
        let at = info::region(n);
        sh.put_u64(slot, at, d.addr);
        sh.put_u64(slot, at + 8, d.len);
        sh.put(slot, at + 16, &d.rkey.to_le_bytes());
    }
    sh.put_u64(slot, info::OWNER_PID, u64::from(new.pid));
    sh.put_u64(slot, info::GENERATION, new.generation);
    sh.put_u64(slot, info::ASSIGNED, assigned);
    t.slots[slot] = Some(Hosted {
        uuid,
        owner: Owner::Conn(conn),
        uid: new.uid,
        pid: new.pid,
        state: info::RUNNING,
        held: Some(Held {
            heap_fd: new.heap_fd,
            heap: new.heap,
            control: new.control,
            crc,
            sealed,
            rkeys: descs.iter().map(|d| d.rkey).collect(),
            npages,
            mode: new.checked.mode,
            sets: new.checked.sets,
            baseline: new.baseline,
            generation: new.generation,
        }),
        stop: Arc::new(AtomicBool::new(false)),
        assigned,
        dead_epoch: u64::MAX,
    });
    t.latest = Some(slot);
    sh.set_state(&mut t, slot, info::RUNNING);
    Ok(slot)
}
