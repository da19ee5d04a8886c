//! The heap: creation, opening, the allocator's fast and slow paths, the
//! root object, and closing.
//!
//! # Crash consistency
//!
//! The durable allocator state is the page descriptors and the slab
//! bitmaps, plus the lanes' intents and caches; a block is allocated iff
//! its bit is set (or its run head says so) and it is not in a lane cache.
//! Every change to it is a single atomic store or read-modify-write, made
//! in an order such that the memory image at *any* instant recovers (see
//! [`crate::recover`]):
//!
//! - pop from a lane cache: load entry, store count (`Release`);
//! - push to a lane cache: write the free canary into the block, store the
//!   entry, store count (`Release`);
//! - refill a cache from a slab the lane owns: store entries, store count,
//!   then set the bits. Only a slab's owner claims free bits, so entries
//!   whose bits are not set yet are still free and recovery's clearing of
//!   cached blocks is right either way;
//! - `alloc_into`: record the intent (block, destination), pop, store the
//!   destination, clear the intent; recovery keeps the block iff the
//!   destination holds it;
//! - slabs and page runs: prepare, then store the head descriptor.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use crate::baseline::{Backend, Baseline, FileBackend};
use crate::check::{CheckReport, LiveState};
use crate::control::Control;
use crate::error::{AllocError, Error, OpenError, PointerError, Result};
use crate::flush::{Durability, FlushError, FlushStats};
use crate::fork::{Forked, NotInherited, Owner};
use crate::format::{hdr, lane, slab, uuid_string, Desc, Header, HeaderError, Layout, PAGE_SIZE};
use crate::lanes::{self, HasLanes, LaneSet, ThreadLanes};
use crate::mem::Mem;
use crate::meta::{LaneWords, Located, Meta};
use crate::pages::PageIndex;
use crate::recover::{recover, RecoveryReport};
use crate::region::{self, Region};
use crate::size_class::{class_for, class_small, CACHE_CAP, CLASSES, MAX_SMALL, NCLASSES, SLAB_PAGES};
use crate::track::{TrackMode, TrackerBuilder};

/// How to create or open a heap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeapOptions {
    size: u64,
    base: Option<u64>,
    tracking: TrackMode,
    flush_interval: Option<Duration>,
    read_only: bool,
}

impl HeapOptions {
    /// A heap of `size` bytes (rounded up to 64 KiB; between 1 MiB and 64
    /// GiB) at a base address remem chooses, tracked in fast mode, flushed
    /// every second.
    pub fn new(size: u64) -> HeapOptions {
        HeapOptions {
            size,
            base: None,
            tracking: TrackMode::Fast,
            flush_interval: Some(Duration::from_secs(1)),
            read_only: false,
        }
    }

    /// Maps the heap at `base` (64 KiB aligned). Every process that opens
    /// the heap later must have this range free.
    pub fn base(mut self, base: u64) -> HeapOptions {
        self.base = Some(base);
        self
    }

    /// How written pages are tracked ([`TrackMode::Fast`] by default;
    /// [`TrackMode::Precise`] keeps the dirty lists complete at every
    /// instant; [`TrackMode::Off`] flushes the whole image every time, for
    /// machines without userfaultfd).
    pub fn tracking(mut self, mode: TrackMode) -> HeapOptions {
        self.tracking = mode;
        self
    }

    /// How often the background flusher runs (`None`: only explicit
    /// [`Heap::flush`] calls and `close`).
    pub fn flush_interval(mut self, every: Option<Duration>) -> HeapOptions {
        self.flush_interval = every;
        self
    }

    /// Opens the heap without ever writing its baseline (`remem check`,
    /// `remem inspect`): a shared lock instead of the exclusive one (so a
    /// live writer keeps it out, and several readers can look at once), the
    /// file opened read-only, recovery run on the in-memory copy only, no
    /// tracking and no flushes; closing just unmaps it. Applies to opens by
    /// path.
    pub fn read_only(mut self, yes: bool) -> HeapOptions {
        self.read_only = yes;
        self
    }
}

/// The baseline a heap was opened from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BaselineInfo {
    /// The last committed flush epoch.
    pub epoch: u64,
    /// When it committed.
    pub committed_at: SystemTime,
    /// How old it was when the heap was opened: updates younger than this
    /// (made after the last flush by a process or host that is gone) are lost.
    pub age: Duration,
    /// Pages taken from the journal rather than the image area.
    pub pages_from_journal: u64,
    /// The heap's generation in the baseline.
    pub generation: u64,
    /// A superblock slot that was damaged or torn and refused, so the
    /// baseline was opened from the other, possibly older, slot: say so to
    /// the operator (`remem check` and `remem inspect` print it).
    pub discarded_slot: Option<crate::baseline::DiscardedSlot>,
}

/// A hook that patches a loaded heap image: gets the header and the
/// bytes, returns the pages it changed (see [`Heap::open_patched`]).
/// The third argument lists the byte ranges of the image that hold data
/// after the load (the rest is zero, and reading it through `bytes` would
/// allocate memory).
pub type PatchHook<'a> = dyn FnMut(&Header, &mut [u8], &[(u64, u64)]) -> std::result::Result<Vec<u64>, String> + 'a;

/// How the memory of a heap being opened is filled.
enum Fill<'a> {
    /// Load the baseline, then let the hook patch the image.
    Load(Option<&'a mut PatchHook<'a>>),
    /// Map a surviving memfd; the pages that may differ from the baseline.
    Memfd(std::os::fd::OwnedFd, Vec<u64>),
}

/// Per-lane state touched only by the thread that holds the lane: no lock.
#[derive(Default)]
struct LaneCell<T>(std::cell::UnsafeCell<T>);

// SAFETY: each cell is only accessed by the one thread holding its lane
// (see `Heap::txv`), so sharing the container between threads is sound.
unsafe impl<T: Send> Sync for LaneCell<T> {}

impl<T> LaneCell<T> {
    /// # Safety
    /// The caller holds the lane and no other reference from this cell is live.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self) -> &mut T {
        // SAFETY: exclusive by the caller's contract.
        unsafe { &mut *self.0.get() }
    }
}

/// Keeps per-lane state on cache lines of its own (no false sharing
/// between threads on different lanes).
#[repr(align(128))]
struct Padded<T>(T);

/// Where a cached block's free canary lives: its second word (like
/// glibc's tcache key), so a check right after the program wrote the
/// block's first bytes does not wait on that store.
const CANARY: usize = 8;

/// No current slab.
const NO_SLAB: u64 = u64::MAX;

/// Shared state of an open heap.
pub(crate) struct Inner {
    id: u64,
    region: Region,
    meta: Meta,
    header: Header,
    /// The image file, for heaps that have one (none for memfd-only heaps).
    path: Option<PathBuf>,
    _lock: Option<NotInherited<File>>,
    canary_key: u64,
    pages: Mutex<PageIndex>,
    partial: Vec<Mutex<Vec<u64>>>,
    /// Per page: the slab there is on its class's partial list.
    listed: Box<[AtomicBool]>,
    /// Per lane and class: the slab the lane claims from.
    cur_slab: Box<[AtomicU64]>,
    lanes: LaneSet,
    root_lock: Mutex<()>,
    /// Stops mutating calls while the flusher captures a cut.
    gate: crate::gate::Gate,
    /// Tracker, control region, baseline and flusher (heaps with a baseline).
    durability: Option<Arc<Durability>>,
    /// The baseline this heap was opened from.
    opened_from: Option<BaselineInfo>,
    /// Per lane: the volatile part of its transaction.
    txv: Box<[Padded<LaneCell<crate::tx::TxVolatile>>]>,
    report: RecoveryReport,
    /// The loader of a heap opened lazily ([`Heap::open_lazy`]).
    lazy: std::sync::OnceLock<Arc<crate::lazy::Lazy>>,
    /// The process (and fork generation) that opened the heap: in a forked
    /// child every call is refused (see [`crate::fork`]).
    owner: Owner,
}

impl HasLanes for Inner {
    fn lanes(&self) -> &LaneSet {
        &self.lanes
    }
}

/// A recoverable heap: a memfd mapped at a fixed address, with its
/// allocator metadata inside it. `Send + Sync`; share it by reference or
/// in an `Arc`.
///
/// Dropping a heap saves its image like [`Heap::close`], but can only print
/// an error; call `close` to see it.
pub struct Heap {
    inner: Arc<Inner>,
    closed: bool,
    /// A stable copy of this handle for [`crate::HeapRef`] lookups.
    registered: Option<Box<Heap>>,
}

impl std::fmt::Debug for Heap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heap")
            .field("path", &self.inner.path)
            .field("uuid", &uuid_string(&self.inner.header.uuid))
            .field("base", &format_args!("{:#x}", self.inner.header.base))
            .field("size", &self.inner.header.layout.size)
            .finish()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Open heaps by base address, for [`crate::HeapRef`]: a heap registers
/// when it opens and leaves when it is dropped.
static OPEN: parking_lot::RwLock<Vec<(u64, usize)>> = parking_lot::RwLock::new(Vec::new());

/// Runs `f` with the open heap at `base`, if there is one. The heap cannot
/// be dropped while `f` runs.
pub(crate) fn with_open_heap<R>(base: u64, f: impl FnOnce(&Heap) -> R) -> Option<R> {
    let open = OPEN.read();
    // SAFETY: every `addr` is the address of a boxed `Heap` registered by
    // `Heap::register` and removed (under the write lock, which the read
    // guard excludes) before that box is freed.
    let heap_at = |addr: usize| unsafe { &*(addr as *const Heap) };
    // A forked child that opened the heap again finds its own copy, not the
    // dead one it inherited (which stays listed: the child leaks it); with
    // no copy of its own, it finds the inherited one, whose calls say Forked.
    let mut found = open.iter().filter(|(b, _)| *b == base).map(|&(_, a)| heap_at(a));
    let first = found.next()?;
    let heap =
        if first.inner.owner.inherited() { found.find(|h| !h.inner.owner.inherited()).unwrap_or(first) } else { first };
    Some(f(heap))
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> OpenError {
    let what = what.into();
    move |source| OpenError::Io { what, source }
}

fn lazy_err(e: crate::lazy::LazyError) -> OpenError {
    OpenError::Lazy(e)
}

/// A heap's baseline file and the lock that keeps other processes out
/// (`None` for a caller-provided backend).
type LockedFile = Option<(PathBuf, NotInherited<File>)>;

/// Decodes the header page of the heap named `name` (for messages).
fn decode_header(first: &[u8], name: &Path) -> Result<Header, OpenError> {
    Header::decode(first).map_err(|e| match e {
        HeaderError::Version(found) => {
            OpenError::Version { path: name.to_owned(), found, supported: crate::format::VERSION }
        }
        e => OpenError::Corrupt { path: name.to_owned(), reason: e.to_string() },
    })
}

/// Reads the header page of a heap's memfd.
fn read_header_page(memfd: &File, first: &mut [u8]) -> Result<(), OpenError> {
    memfd.read_exact_at(first, 0).map_err(io("reading the heap header from the memfd"))
}

/// Locks an existing baseline file and opens it: what every open by path
/// needs. A writer takes the exclusive lock and opens the file read-write; a
/// read-only open ([`HeapOptions::read_only`]) takes the shared lock and opens
/// it read-only, so nothing it does can write the file.
fn open_baseline_file(path: &Path, read_only: bool) -> Result<(Arc<dyn Backend>, LockedFile), OpenError> {
    let file = take_lock(path, if read_only { LockKind::Reader } else { LockKind::Writer })?;
    BaselineLock { path: path.to_owned(), file }.into_backend(read_only)
}

/// The exclusive lock on a baseline that every writer of the file takes:
/// held, nobody else can open the heap for writing or recover it. Taken
/// alone by a recovery before it fences the old owner, then handed to
/// [`Heap::open_patched`]. It is an OFD lock on the baseline file itself,
/// so every path to the file (symlink, hard link, another mount) meets it.
#[derive(Debug)]
pub struct BaselineLock {
    path: PathBuf,
    file: NotInherited<File>,
}

impl BaselineLock {
    /// Takes the writer's lock of the baseline at `path` without waiting;
    /// [`OpenError::Locked`] when another open of the same file (by any
    /// path, in any process) holds it.
    pub fn take(path: impl AsRef<Path>) -> Result<BaselineLock> {
        let path = path.as_ref();
        Ok(BaselineLock { path: path.to_owned(), file: take_lock(path, LockKind::Writer)? })
    }

    /// Takes over the baseline of an owner that is proven hung (its lease
    /// expired: see `control.rs`) and still holds the writer's lock: takes
    /// the file's *takeover* lock instead (another byte of the same OFD lock
    /// space), which every recovery that takes over holds, so two of them
    /// exclude each other. The hung process keeps its own lock until it
    /// exits; the generation fence keeps it from committing in the meantime.
    pub fn take_over(path: impl AsRef<Path>) -> Result<BaselineLock> {
        let path = path.as_ref();
        Ok(BaselineLock { path: path.to_owned(), file: take_lock(path, LockKind::Takeover)? })
    }

    /// After a hung owner was fenced (this lock from
    /// [`BaselineLock::take_over`], then the generation fence written to the
    /// file): moves the baseline to a new inode, so that nothing the hung
    /// process does when it resumes reaches the recovered baseline. Its
    /// flusher checks the fence before each write, but a process stopped
    /// between that check and the write (SIGSTOP lands anywhere) writes once
    /// more when it resumes, and its descriptors name the inode, not the
    /// path. The file is copied (a reflink where the filesystem has them,
    /// else its data extents, holes kept) to `<path>.takeover`, synced,
    /// locked (writer and takeover bytes), renamed over `path`, and the
    /// directory synced. The old, fenced inode lives on only while the hung
    /// process holds it open: its later flushes fail as fenced and land
    /// nowhere that matters. Costs one in-kernel copy of the baseline's data.
    pub fn move_from_hung_owner(self) -> Result<BaselineLock> {
        let path = self.path.clone();
        let what = |w: &str| format!("{w} {} to move the baseline away from its hung owner", path.display());
        let mut tmp = path.clone().into_os_string();
        tmp.push(".takeover");
        let tmp = PathBuf::from(tmp);
        // A leftover of an earlier recovery killed here: nobody else holds
        // it (we hold the takeover lock of the file it was copied from).
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(what("removing the old"))(e).into()),
            _ => {}
        }
        let src = File::open(&path).map_err(io(what("opening")))?;
        let dst = NotInherited::new(
            OpenOptions::new().read(true).write(true).create_new(true).open(&tmp).map_err(io(what("creating")))?,
        );
        let meta = src.metadata().map_err(io(what("reading the metadata of")))?;
        dst.get().set_permissions(meta.permissions()).map_err(io(what("setting the permissions of")))?;
        {
            use std::os::unix::fs::MetadataExt;
            // The copy keeps the file's owner, so the database that reopens
            // it can: a recovery that runs as another user must be root.
            std::os::unix::fs::fchown(dst.get(), Some(meta.uid()), Some(meta.gid()))
                .map_err(io(what("giving the copy the owner and group of (run the recovery as its owner or root)")))?;
        }
        let moved = (|| {
            for byte in [region::LOCK_WRITER, region::LOCK_TAKEOVER] {
                if !region::try_lock(dst.get(), true, byte).map_err(io(what("locking")))? {
                    return Err(OpenError::Locked(tmp.clone()));
                }
            }
            region::copy_sparse(&src, dst.get()).map_err(io(what("copying")))?;
            dst.get().sync_all().map_err(io(what("syncing")))?;
            std::fs::rename(&tmp, &path).map_err(io(what("renaming the copy of")))
        })();
        if let Err(e) = moved {
            let _ = std::fs::remove_file(&tmp); // the baseline itself is as it was
            return Err(e.into());
        }
        region::sync_parent(&path).map_err(io(what("syncing the directory of")))?;
        drop(self); // the old inode's takeover lock: the path no longer names it
        Ok(BaselineLock { path, file: dst })
    }

    /// The baseline file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the locked baseline (read-write, or read-only for a reader)
    /// and hands the lock over with it.
    fn into_backend(self, read_only: bool) -> Result<(Arc<dyn Backend>, LockedFile), OpenError> {
        let BaselineLock { path, file } = self;
        let what = format!("opening baseline {}", path.display());
        let backend =
            if read_only { FileBackend::open_read_only(&path) } else { FileBackend::open(&path) }.map_err(io(what))?;
        Ok((Arc::new(backend), Some((path, file))))
    }
}

/// Which of the baseline file's locks (see [`region::try_lock`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LockKind {
    /// Exclusive on the writer byte: a database or a recovery.
    Writer,
    /// Shared on the writer byte: `check`, `inspect`, read-only opens.
    Reader,
    /// Exclusive on the takeover byte: a recovery of a hung owner.
    Takeover,
}

/// Takes one of the baseline's locks: an OFD lock on the file itself (its
/// inode), so every path to the same file meets it. A forked child does
/// not keep the lock (see [`crate::fork`]): the parent's close or death
/// releases it.
fn take_lock(path: &Path, kind: LockKind) -> Result<NotInherited<File>, OpenError> {
    let exclusive = kind != LockKind::Reader;
    let f = OpenOptions::new()
        .read(true)
        .write(exclusive)
        .open(path)
        .map_err(io(format!("opening baseline {} to lock it", path.display())))?;
    // Registered before it is locked: a fork from another thread in between
    // must not leave the child holding the lock.
    let f = NotInherited::new(f);
    let byte = if kind == LockKind::Takeover { region::LOCK_TAKEOVER } else { region::LOCK_WRITER };
    if !region::try_lock(f.get(), exclusive, byte).map_err(io(format!("locking {}", path.display())))? {
        return Err(OpenError::Locked(path.to_owned()));
    }
    // A recovery that took over from a hung owner renames a copy over the
    // path ([`BaselineLock::move_from_hung_owner`]): a lock on the inode the
    // path named before that protects nothing.
    if !region::same_inode(f.get(), path).map_err(io(format!("checking {}", path.display())))? {
        return Err(OpenError::Locked(path.to_owned()));
    }
    Ok(f)
}

impl Heap {
    /// Creates a new heap whose baseline file is `path` (which must not
    /// exist; any filesystem, local or shared).
    pub fn create(path: impl AsRef<Path>, opts: &HeapOptions) -> Result<Heap> {
        let path = path.as_ref();
        if path.exists() {
            return Err(OpenError::AlreadyExists(path.to_owned()).into());
        }
        // The file is created exclusively (O_EXCL), then locked: until the
        // new baseline's superblock is written, any other open finds it too
        // short and fails.
        let backend = FileBackend::create(path).map_err(io(format!("creating baseline {}", path.display())))?;
        let lock = take_lock(path, LockKind::Writer)?;
        Self::create_inner(Arc::new(backend), opts, Some((path.to_owned(), lock)))
    }

    /// [`Heap::create`] on a caller-provided baseline backend (for tests
    /// with a fault-injecting backend, or storage that is not a file).
    pub fn create_on(backend: Arc<dyn Backend>, opts: &HeapOptions) -> Result<Heap> {
        Self::create_inner(backend, opts, None)
    }

    fn create_inner(backend: Arc<dyn Backend>, opts: &HeapOptions, file: LockedFile) -> Result<Heap> {
        let (region, header, meta) = Self::new_region(opts)?;
        let name = file.as_ref().map_or_else(|| PathBuf::from("<backend>"), |f| f.0.clone());
        let bl_err = |e: crate::baseline::BaselineError| OpenError::Baseline { path: name.clone(), source: e };
        let mut baseline =
            Baseline::create(backend, header.uuid, header.layout.size, header.generation).map_err(bl_err)?;
        // Epoch 1: the pages that hold data now (the metadata).
        let ranges = region.data_ranges().map_err(io("finding data in the heap memfd"))?;
        let pages: Vec<u64> =
            ranges.iter().flat_map(|&(s, e)| s / PAGE_SIZE as u64..e.div_ceil(PAGE_SIZE as u64)).collect();
        baseline.commit(1, pages.iter().map(|&p| (p, Self::page_bytes(&meta, p)))).map_err(bl_err)?;
        if let Some((path, _)) = &file {
            region::sync_parent(path).map_err(io(format!("syncing the directory of {}", path.display())))?;
        }
        let (report, vol) = recover(&meta).map_err(|reason| OpenError::Corrupt { path: name.clone(), reason })?;
        let dur = Self::durability(&region, &header, baseline, opts.tracking)?;
        let mut heap = Self::assemble(region, meta, header, file, report, vol, Some(dur), None)?;
        heap.start_flusher(opts);
        Ok(heap)
    }

    /// A fresh, formatted heap memory: memfd, mapping, header, metadata.
    fn new_region(opts: &HeapOptions) -> Result<(Region, Header, Meta), OpenError> {
        region::check_page_size()?;
        let size = Self::check_size(opts.size)?;
        let uuid = region::random_uuid()?;
        let base = match opts.base {
            Some(b) => {
                region::check_base(b, size)?;
                b
            }
            None => region::choose_base(&uuid, size)?,
        };
        let header = Header { uuid, base, generation: 1, layout: Layout::for_size(size) };
        let fd = region::memfd(&format!("remem:{}", uuid_string(&uuid)), size)?;
        let region = Region::map(fd, base, size)?;
        let meta = Self::meta_of(&region, &header);
        meta.mem.write(0, &header.encode());
        for p in 0..header.layout.first_data_page() {
            meta.desc(p).store(Desc::Meta.encode(), Relaxed);
        }
        Ok((region, header, meta))
    }

    fn page_bytes(meta: &Meta, p: u64) -> &[u8] {
        // SAFETY: page `p` lies inside the mapping, which outlives `meta`'s
        // users here; nobody else mutates the heap yet.
        unsafe { std::slice::from_raw_parts(meta.mem.ptr(p as usize * PAGE_SIZE), PAGE_SIZE) }
    }

    fn check_size(size: u64) -> Result<u64, OpenError> {
        let rounded = size.checked_next_multiple_of(crate::format::HEAP_ALIGN).unwrap_or(u64::MAX);
        if !(crate::format::MIN_HEAP..=crate::format::MAX_HEAP).contains(&rounded) {
            return Err(OpenError::BadSize { size, min: crate::format::MIN_HEAP, max: crate::format::MAX_HEAP });
        }
        Ok(rounded)
    }

    /// Builds the tracker (all pages clean: memory equals the baseline
    /// now), the control region and the flusher state.
    fn durability(
        region: &Region,
        header: &Header,
        baseline: Baseline<Arc<dyn Backend>>,
        mode: TrackMode,
    ) -> Result<Arc<Durability>, OpenError> {
        let npages = header.layout.npages();
        let control = Control::create(&header.uuid, npages, mode)?;
        let builder = TrackerBuilder::new(mode);
        let tracker: Box<dyn crate::track::Tracker> = match mode {
            TrackMode::Precise => {
                Box::new(builder.build_precise_in(region.base(), region.len(), Box::new(control.current_words()))?)
            }
            _ => builder.build(region.base(), region.len())?,
        };
        tracker.protect_all()?;
        Ok(Arc::new(Durability::new(baseline, tracker, control)?))
    }

    fn start_flusher(&mut self, opts: &HeapOptions) {
        if let Some(d) = &self.inner.durability {
            d.start(opts.flush_interval, Arc::downgrade(&self.inner), Inner::flush);
        }
    }

    /// Opens the heap whose baseline is at `path`: maps it at its recorded
    /// address, loads the last committed flush, and runs recovery
    /// ([`Heap::recovery_report`] says what it did and how old the baseline
    /// was). Tracked in fast mode, flushed every second.
    pub fn open(path: impl AsRef<Path>) -> Result<Heap> {
        Self::open_with(path, &HeapOptions::new(0))
    }

    /// [`Heap::open`] with options (`size` and `base` are ignored: the
    /// baseline has them).
    pub fn open_with(path: impl AsRef<Path>, opts: &HeapOptions) -> Result<Heap> {
        let path = path.as_ref();
        let (backend, file) = open_baseline_file(path, opts.read_only)?;
        Self::open_inner(backend, opts, file)
    }

    /// [`Heap::open_with`] on a caller-provided baseline backend.
    pub fn open_on(backend: Arc<dyn Backend>, opts: &HeapOptions) -> Result<Heap> {
        Self::open_inner(backend, opts, None)
    }

    fn open_inner(backend: Arc<dyn Backend>, opts: &HeapOptions, file: LockedFile) -> Result<Heap> {
        Self::open_filled(backend, opts, file, Fill::Load(None))
    }

    /// [`Heap::open_with`], with a hook that patches the image after the
    /// baseline is loaded and before anything else sees it: it gets the
    /// heap's header and its bytes, and returns the pages it changed (they
    /// are flushed by the next flush). An `Err` from the hook fails the open
    /// and leaves the baseline as it was. `remem recover` uses this to lay
    /// the pages pulled from a failed host over the baseline.
    ///
    /// It takes the baseline's lock from the caller ([`BaselineLock::take`]),
    /// so that a recovery can hold the lock before it fences the old owner
    /// and keep it until the heap is open.
    pub fn open_patched(lock: BaselineLock, opts: &HeapOptions, hook: &mut PatchHook<'_>) -> Result<Heap> {
        let (backend, file) = lock.into_backend(false)?;
        Self::open_filled(backend, opts, file, Fill::Load(Some(hook)))
    }

    /// Same-host restart: maps the heap's surviving memfd (kept by the
    /// agent after the database process died) at its address, with no
    /// copy, and continues flushing to the baseline at `path`. `dirty` names
    /// the pages that may differ from the baseline (the agent's sealed
    /// lists); they go into the next flush.
    pub fn attach_durable(
        memfd: std::os::fd::OwnedFd,
        path: impl AsRef<Path>,
        opts: &HeapOptions,
        dirty: &[u64],
    ) -> Result<Heap> {
        let path = path.as_ref();
        let (backend, file) = open_baseline_file(path, false)?;
        Self::open_filled(backend, opts, file, Fill::Memfd(memfd, dirty.to_vec()))
    }

    fn open_filled(backend: Arc<dyn Backend>, opts: &HeapOptions, file: LockedFile, fill: Fill<'_>) -> Result<Heap> {
        region::check_page_size()?;
        let name = file.as_ref().map_or_else(|| PathBuf::from("<backend>"), |f| f.0.clone());
        let bl_err = |e: crate::baseline::BaselineError| OpenError::Baseline { path: name.clone(), source: e };
        let baseline = Baseline::open(backend).map_err(bl_err)?;
        let mut first = vec![0u8; PAGE_SIZE];
        match &fill {
            Fill::Load(_) => baseline.read_page(0, &mut first).map_err(bl_err)?,
            Fill::Memfd(fd, _) => read_header_page(&File::from(fd.try_clone().map_err(io("dup memfd"))?), &mut first)?,
        }
        let header = decode_header(&first, &name)?;
        baseline.check_heap(header.uuid, header.layout.size).map_err(bl_err)?;
        let size = header.layout.size;
        let info = baseline.info();
        let (region, dirty, from_journal) = match fill {
            Fill::Load(hook) => {
                let fd = region::memfd(&format!("remem:{}", uuid_string(&header.uuid)), size)?;
                let region = Region::map(fd, header.base, size)?;
                // SAFETY: the fresh mapping is `size` bytes and nothing else uses it yet.
                let dst = unsafe { std::slice::from_raw_parts_mut(region.base(), size as usize) };
                let load = baseline.load_into_zeroed(dst).map_err(bl_err)?;
                let dirty = match hook {
                    Some(h) => {
                        let ranges = region.data_ranges().map_err(io("finding data in the heap memfd"))?;
                        h(&header, dst, &ranges).map_err(|reason| OpenError::Patch { path: name.clone(), reason })?
                    }
                    None => Vec::new(),
                };
                (region, dirty, load.from_journal)
            }
            Fill::Memfd(fd, dirty) => {
                // Mapping more than the memfd holds would turn reads past its
                // end into SIGBUS; a longer one is not this heap's either.
                let len = region::fd_len(&fd).map_err(io("measuring the heap memfd"))?;
                if len != size {
                    return Err(OpenError::Corrupt {
                        path: name.clone(),
                        reason: format!("the memfd is {len} bytes, its header says the heap is {size}"),
                    }
                    .into());
                }
                (Region::map(fd, header.base, size)?, dirty, 0)
            }
        };
        let committed_at = std::time::UNIX_EPOCH + Duration::from_nanos(info.commit_unix_ns);
        let from = BaselineInfo {
            epoch: info.epoch,
            committed_at,
            age: committed_at.elapsed().unwrap_or_default(),
            pages_from_journal: from_journal,
            generation: info.generation,
            discarded_slot: baseline.discarded_slot().cloned(),
        };
        // Track before recovering, so that recovery's repairs are flushed
        // (a read-only open repairs its private copy only).
        let dur = if opts.read_only {
            None
        } else {
            let dur = Self::durability(&region, &header, baseline, opts.tracking)?;
            for &p in dirty.iter().filter(|&&p| p < header.layout.npages()) {
                dur.tracker.mark_dirty(p, 1);
            }
            Some(dur)
        };
        let meta = Self::meta_of(&region, &header);
        let (report, vol) = recover(&meta).map_err(|reason| OpenError::Corrupt { path: name.clone(), reason })?;
        let mut heap = Self::assemble(region, meta, header, file, report, vol, dur, Some(from))?;
        heap.start_flusher(opts);
        Ok(heap)
    }

    /// Opens the heap whose baseline is at `path` *lazily*: returns as soon
    /// as the pages the recovery pass reads are in, and fetches every other
    /// page from `source` on first touch (userfaultfd) while a background
    /// prefetcher brings in the rest. `source` gives the newest copy of each
    /// page (a [`crate::source::Layered`] source over an agent and the
    /// baseline, or a [`crate::source::BaselineSource`] alone). Writes are
    /// tracked from the start; no flush commits until every page is in, then
    /// the recovered state is committed once ([`Heap::lazy_status`],
    /// [`Heap::wait_lazy`]). See [`crate::lazy`].
    pub fn open_lazy(
        path: impl AsRef<Path>,
        opts: &HeapOptions,
        source: Arc<dyn crate::source::PageSource>,
    ) -> Result<Heap> {
        let (backend, file) = open_baseline_file(path.as_ref(), false)?;
        Self::open_lazy_inner(backend, opts, file, source)
    }

    /// [`Heap::open_lazy`] with the baseline's lock taken by the caller: a
    /// recovery holds it from before it fences the old owner (see
    /// [`Heap::open_patched`]).
    pub fn open_lazy_locked(
        lock: BaselineLock,
        opts: &HeapOptions,
        source: Arc<dyn crate::source::PageSource>,
    ) -> Result<Heap> {
        let (backend, file) = lock.into_backend(false)?;
        Self::open_lazy_inner(backend, opts, file, source)
    }

    /// [`Heap::open_lazy_locked`] on a baseline the caller opened (and
    /// fenced) already, so it is not read again: the heap commits through
    /// `baseline`, which must be the file `lock` holds.
    pub fn open_lazy_fenced(
        lock: BaselineLock,
        baseline: Baseline<Arc<dyn Backend>>,
        opts: &HeapOptions,
        source: Arc<dyn crate::source::PageSource>,
    ) -> Result<Heap> {
        let BaselineLock { path, file } = lock;
        Self::open_lazy_from(baseline, opts, Some((path, file)), source)
    }

    /// [`Heap::open_lazy`] on a caller-provided baseline backend.
    pub fn open_lazy_on(
        backend: Arc<dyn Backend>,
        opts: &HeapOptions,
        source: Arc<dyn crate::source::PageSource>,
    ) -> Result<Heap> {
        Self::open_lazy_inner(backend, opts, None, source)
    }

    fn open_lazy_inner(
        backend: Arc<dyn Backend>,
        opts: &HeapOptions,
        file: LockedFile,
        source: Arc<dyn crate::source::PageSource>,
    ) -> Result<Heap> {
        let name = file.as_ref().map_or_else(|| PathBuf::from("<backend>"), |f| f.0.clone());
        let baseline = Baseline::open(backend).map_err(|e| OpenError::Baseline { path: name.clone(), source: e })?;
        Self::open_lazy_from(baseline, opts, file, source)
    }

    fn open_lazy_from(
        baseline: Baseline<Arc<dyn Backend>>,
        opts: &HeapOptions,
        file: LockedFile,
        source: Arc<dyn crate::source::PageSource>,
    ) -> Result<Heap> {
        region::check_page_size()?;
        let t0 = std::time::Instant::now();
        let mut phases = Phases::default();
        let name = file.as_ref().map_or_else(|| PathBuf::from("<backend>"), |f| f.0.clone());
        let bl_err = |e: crate::baseline::BaselineError| OpenError::Baseline { path: name.clone(), source: e };
        let mut first = vec![0u8; PAGE_SIZE];
        baseline.read_page(0, &mut first).map_err(bl_err)?;
        let header = decode_header(&first, &name)?;
        baseline.check_heap(header.uuid, header.layout.size).map_err(bl_err)?;
        let info = baseline.info();
        let discarded_slot = baseline.discarded_slot().cloned();
        phases.mark("header", t0);
        let size = header.layout.size;
        let fd = region::memfd(&format!("remem:{}", uuid_string(&header.uuid)), size)?;
        let region = Region::map(fd, header.base, size)?;
        phases.mark("map", t0);
        let (uffd, raw) =
            crate::lazy::open_uffd(region.base(), region.len(), opts.tracking == TrackMode::Fast).map_err(lazy_err)?;
        let npages = header.layout.npages();
        let states = Arc::new(crate::source::PageStates::new(npages).map_err(|e| {
            lazy_err(crate::lazy::LazyError::Uffd { op: "mapping the page state table", reason: e.to_string() })
        })?);
        phases.mark("userfaultfd", t0);
        let tracking =
            crate::lazy::durability(region.base(), region.len(), &header.uuid, baseline, opts.tracking, &raw, &states)?;
        let dur = tracking.0.clone();
        phases.mark("tracker", t0);
        let lazy = crate::lazy::Lazy::new(region.base(), (uffd, raw), source, states, tracking);
        let lazy = Arc::new(lazy.map_err(lazy_err)?);
        lazy.start_faults().map_err(lazy_err)?;
        phases.mark("fault thread", t0);
        lazy.fetch_now(0, header.layout.first_data_page()).map_err(lazy_err)?;
        phases.mark("metadata pages", t0);
        let committed_at = std::time::UNIX_EPOCH + Duration::from_nanos(info.commit_unix_ns);
        let from = BaselineInfo {
            epoch: info.epoch,
            committed_at,
            age: committed_at.elapsed().unwrap_or_default(),
            pages_from_journal: info.journal_pages,
            generation: info.generation,
            discarded_slot,
        };
        let meta = Self::meta_of(&region, &header);
        let (report, vol) = recover(&meta).map_err(|reason| OpenError::Corrupt { path: name.clone(), reason })?;
        phases.mark("recovery pass", t0);
        let mut heap = Self::assemble(region, meta, header, file, report, vol, Some(dur), Some(from))?;
        let _ = heap.inner.lazy.set(lazy.clone());
        heap.start_flusher(opts);
        let weak = Arc::downgrade(&heap.inner);
        lazy.start_prefetch(Box::new(move || weak.upgrade().map(|inner| inner.flush()))).map_err(lazy_err)?;
        phases.mark("assembled", t0);
        log::debug!("remem: lazy open of {} in {:?}: {phases}", name.display(), t0.elapsed());
        Ok(heap)
    }

    /// Where lazy loading stands (`None` unless opened with [`Heap::open_lazy`]).
    pub fn lazy_status(&self) -> Option<crate::lazy::LazyStatus> {
        self.inner.lazy.get().map(|l| l.status())
    }

    /// Blocks until every page of a lazily opened heap is in and the
    /// recovered state is committed (or loading failed: see
    /// [`crate::lazy::LazyStatus::failed`]); `None` for a heap not opened lazily.
    ///
    /// # Panics
    /// In a forked child, on a heap the parent opened (see [`crate::fork`]).
    pub fn wait_lazy(&self) -> Option<crate::lazy::LazyStatus> {
        self.not_forked();
        self.inner.lazy.get().map(|l| l.wait_done())
    }

    /// Creates a heap that lives only in a memfd (no image file): its
    /// memory outlives this process as long as some process holds the
    /// memfd (see [`Heap::memfd`] and [`Heap::attach`]).
    pub fn create_memfd(opts: &HeapOptions) -> Result<Heap> {
        let (region, header, meta) = Self::new_region(opts)?;
        let (report, vol) = recover(&meta).map_err(|reason| OpenError::Corrupt { path: "<memfd>".into(), reason })?;
        Self::assemble(region, meta, header, None, report, vol, None, None)
    }

    /// Maps a heap's memfd (handed over by another process, whose copy of
    /// the heap may have died at any instant) at the heap's recorded
    /// address and runs recovery. The memory is shared, not copied.
    pub fn attach(fd: std::os::fd::OwnedFd) -> Result<Heap> {
        region::check_page_size()?;
        let file = File::from(fd);
        let mut first = vec![0u8; PAGE_SIZE];
        read_header_page(&file, &mut first)?;
        let header = decode_header(&first, Path::new("<memfd>"))?;
        let len = file.metadata().map_err(io("stat memfd"))?.len();
        if len < header.layout.size {
            return Err(OpenError::Corrupt {
                path: "<memfd>".into(),
                reason: format!("memfd is {len} bytes, the header says {}", header.layout.size),
            }
            .into());
        }
        let region = Region::map(file.into(), header.base, header.layout.size)?;
        let meta = Self::meta_of(&region, &header);
        let (report, vol) = recover(&meta).map_err(|reason| OpenError::Corrupt { path: "<memfd>".into(), reason })?;
        Self::assemble(region, meta, header, None, report, vol, None, None)
    }

    fn meta_of(region: &Region, header: &Header) -> Meta {
        // SAFETY: the region maps `len` bytes at a 64 KiB aligned base and
        // outlives every `Meta` made from it (both live in `Inner`).
        let mem = unsafe { Mem::new(region.base(), region.len()) };
        Meta::new(mem, header)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        region: Region,
        meta: Meta,
        header: Header,
        file: LockedFile,
        report: RecoveryReport,
        vol: crate::recover::Volatile,
        durability: Option<Arc<Durability>>,
        opened_from: Option<BaselineInfo>,
    ) -> Result<Heap> {
        let (path, lock) = match file {
            Some((p, l)) => (Some(p), Some(l)),
            None => (None, None),
        };
        let npages = header.layout.npages() as usize;
        let listed: Box<[AtomicBool]> = (0..npages).map(|_| AtomicBool::new(false)).collect();
        for list in &vol.partial {
            for &p in list {
                listed[p as usize].store(true, Relaxed);
            }
        }
        let nlanes = header.layout.nlanes;
        let inner = Inner {
            id: NEXT_ID.fetch_add(1, Relaxed),
            meta,
            header,
            path,
            _lock: lock,
            canary_key: u64::from_le_bytes(region::random_uuid()?[..8].try_into().expect("8 bytes")) | 1,
            pages: Mutex::new(vol.pages),
            partial: vol.partial.into_iter().map(Mutex::new).collect(),
            listed,
            cur_slab: (0..nlanes as usize * NCLASSES).map(|_| AtomicU64::new(NO_SLAB)).collect(),
            lanes: LaneSet::new(nlanes),
            root_lock: Mutex::new(()),
            txv: (0..nlanes).map(|_| Padded(LaneCell::default())).collect(),
            gate: crate::gate::Gate::new(nlanes),
            durability,
            opened_from,
            report,
            region,
            lazy: std::sync::OnceLock::new(),
            owner: Owner::current(),
        };
        let inner = Arc::new(inner);
        let twin = Box::new(Heap { inner: inner.clone(), closed: true, registered: None });
        OPEN.write().push((inner.header.base, &*twin as *const Heap as usize));
        Ok(Heap { inner, closed: false, registered: Some(twin) })
    }

    /// A persistent handle to this heap, usable as an allocator by
    /// collections that themselves live in the heap (see [`crate::HeapRef`]).
    pub fn handle(&self) -> crate::HeapRef {
        crate::HeapRef::new(self.inner.header.base)
    }

    /// Flushes what changed, compacts the baseline and stops the flusher:
    /// after `close` returns `Ok`, the baseline holds everything. A
    /// memfd-only heap is just unmapped.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        self.finish()
    }

    fn finish(&self) -> Result<()> {
        self.inner.owner.check()?;
        let Some(d) = &self.inner.durability else { return Ok(()) };
        d.stop();
        self.inner.flush()?;
        d.apply()?;
        d.mark_closed();
        Ok(())
    }

    /// Writes every page changed since the last flush to the baseline and
    /// returns the epoch that is now durable (see [`crate::flush`] for the
    /// epoch switch and its pause).
    pub fn flush(&self) -> Result<u64, FlushError> {
        self.inner.owner.check()?;
        self.inner.flush()
    }

    /// Blocks until flush epoch `epoch` is durable in the baseline (or
    /// fails because durability is poisoned).
    pub fn wait_durable(&self, epoch: u64) -> Result<(), FlushError> {
        self.inner.owner.check()?;
        self.inner.durability.as_ref().ok_or(FlushError::NoBaseline)?.wait_durable(epoch)
    }

    /// The epoch that writes made now belong to: durable once
    /// `wait_durable(current_epoch())` returns.
    pub fn current_epoch(&self) -> Result<u64, FlushError> {
        self.inner.owner.check()?;
        Ok(self.inner.durability.as_ref().ok_or(FlushError::NoBaseline)?.current_epoch())
    }

    /// Durability statistics (`None` for a memfd-only heap).
    ///
    /// # Panics
    /// In a forked child, on a heap the parent opened (see [`crate::fork`]).
    pub fn flush_stats(&self) -> Option<FlushStats> {
        self.not_forked();
        self.inner.durability.as_ref().map(|d| d.stats())
    }

    /// The baseline this heap was loaded from (`None` when created, or memfd-only).
    pub fn opened_from(&self) -> Option<BaselineInfo> {
        self.inner.opened_from.clone()
    }

    /// The tracking mode (`None` for a memfd-only heap).
    pub fn tracking(&self) -> Option<TrackMode> {
        self.inner.durability.as_ref().map(|d| d.tracker.mode())
    }

    /// Pages that may differ from the baseline, as the dirty lists say:
    /// the current set (precise mode) and the set of the flush in progress.
    ///
    /// # Panics
    /// In a forked child, on a heap the parent opened (see [`crate::fork`]).
    pub fn dirty_pages(&self) -> Vec<u64> {
        self.not_forked();
        let mut out = Vec::new();
        if let Some(d) = &self.inner.durability {
            d.dirty_pages(&mut out);
        }
        out
    }

    /// The control region's memfd (dirty lists and epochs, for the agent).
    pub fn control_memfd(&self) -> Option<&std::os::fd::OwnedFd> {
        self.inner.durability.as_ref().map(|d| d.control.fd())
    }

    /// Tells the tracker that `len` bytes at `ptr` were written by
    /// something the page tables do not see (device DMA, `O_DIRECT` reads
    /// into the heap, RDMA writes, io_uring fixed buffers).
    pub fn mark_dirty(&self, ptr: *const u8, len: usize) -> Result<()> {
        self.inner.owner.check()?;
        let off = self.offset_of(ptr).ok_or(PointerError::NotInHeap(ptr as usize))?;
        if len == 0 {
            return Ok(());
        }
        if off + len > self.size() as usize {
            return Err(PointerError::NotInHeap(ptr as usize + len).into());
        }
        if let Some(d) = &self.inner.durability {
            let first = (off / PAGE_SIZE) as u64;
            let last = ((off + len - 1) / PAGE_SIZE) as u64;
            d.tracker.mark_dirty(first, last - first + 1);
        }
        Ok(())
    }

    /// What recovery did when this heap was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.report
    }

    /// First byte of the heap (its fixed base address).
    pub fn base(&self) -> *mut u8 {
        self.inner.region.base()
    }

    /// Heap size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.header.layout.size
    }

    /// The heap's UUID, formatted.
    pub fn uuid(&self) -> String {
        uuid_string(&self.inner.header.uuid)
    }

    /// The heap's generation.
    pub fn generation(&self) -> u64 {
        self.inner.header.generation
    }

    /// The file that holds the heap's image (`None` for a memfd-only heap).
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The heap's memfd (for handing to another process).
    pub fn memfd(&self) -> &std::os::fd::OwnedFd {
        self.inner.region.fd()
    }

    /// True when `ptr` points into the heap's data area.
    pub fn contains(&self, ptr: *const u8) -> bool {
        self.offset_of(ptr).is_some_and(|o| o >= self.inner.header.layout.data_off as usize)
    }

    /// Heap offset of `ptr`, if it is inside the heap.
    pub fn offset_of(&self, ptr: *const u8) -> Option<usize> {
        let off = (ptr as usize).wrapping_sub(self.base() as usize);
        (off < self.size() as usize).then_some(off)
    }

    /// Address of heap offset `off` (`off < size`).
    pub fn at_offset(&self, off: usize) -> Option<NonNull<u8>> {
        (off < self.size() as usize).then(|| NonNull::new(self.inner.meta.mem.ptr(off)).expect("heap is not at 0"))
    }

    /// Runs the mutating call `f` on this thread's lane. The lane cache
    /// hit is the fast path; a forked child's cache is empty (see
    /// [`crate::fork`]), so the slow path is where an inherited heap is refused.
    #[inline]
    fn with_lane<R, E: From<Forked>>(&self, f: impl FnOnce(u32) -> Result<R, E>) -> Result<R, E> {
        lanes::with_own(|t| self.with_lane_in(t, f))
    }

    /// [`Heap::with_lane`] with the lane cache `t`, a thread-local of this
    /// thread without destructor (see [`lanes::acquire`]).
    #[inline]
    fn with_lane_in<R, E: From<Forked>>(&self, t: &ThreadLanes, f: impl FnOnce(u32) -> Result<R, E>) -> Result<R, E> {
        match t.last(self.inner.id) {
            Some(l) => self.in_gate(l, f),
            None => self.with_lane_slow(t, f),
        }
    }

    #[cold]
    #[inline(never)]
    fn with_lane_slow<R, E: From<Forked>>(&self, t: &ThreadLanes, f: impl FnOnce(u32) -> Result<R, E>) -> Result<R, E> {
        self.inner.owner.check()?;
        let home: Arc<dyn HasLanes> = self.inner.clone();
        // SAFETY: every caller passes remem-alloc's own thread-local or one
        // an `*_in` caller vouched for (their safety contract).
        match unsafe { lanes::acquire(self.inner.id, &home, t) } {
            0 => {
                let _g = self.inner.lanes.shared.lock();
                self.in_gate(0, f)
            }
            l => self.in_gate(l, f),
        }
    }

    /// Runs the mutating call `f` on lane `l` inside the flush gate.
    #[inline(always)]
    pub(crate) fn in_gate<R>(&self, l: u32, f: impl FnOnce(u32) -> R) -> R {
        let _inside = self.inner.gate.inside(l);
        f(l)
    }

    /// Allocates `size` bytes (16-byte aligned).
    #[inline]
    pub fn alloc(&self, size: usize) -> Result<NonNull<u8>> {
        self.alloc_aligned(size, 16)
    }

    /// Allocates `size` bytes aligned to `align` (a power of two, at most 4096).
    #[inline]
    pub fn alloc_aligned(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        // SAFETY: OWN is a thread-local without destructor.
        lanes::with_own(|t| unsafe { self.alloc_in(t, size, align) })
    }

    /// [`Heap::alloc_aligned`] with the caller's lane cache `lanes` instead
    /// of remem-alloc's own: for an embedder that already looked up a
    /// thread-local of its own (the C ABI), so that the call looks up none.
    ///
    /// # Safety
    ///
    /// `lanes` must be a thread-local of the calling thread (a `static` in
    /// `thread_local!`) whose type has no destructor, so that it lives as
    /// long as the thread: the heap remembers it and empties it when the
    /// thread's lanes are handed back at thread exit.
    #[inline(always)]
    pub unsafe fn alloc_in(&self, lanes: &ThreadLanes, size: usize, align: usize) -> Result<NonNull<u8>> {
        let off = self.alloc_off(lanes, size, align)?;
        // SAFETY: the allocator just wrote the block's canary word, so `off`
        // is inside the mapping, which is never at address 0.
        Ok(unsafe { NonNull::new_unchecked(self.inner.meta.mem.ptr_seen(off)) })
    }

    /// Allocates `size` zeroed bytes.
    pub fn alloc_zeroed(&self, size: usize) -> Result<NonNull<u8>> {
        let p = self.alloc(size)?;
        // SAFETY: the block is ours and at least `size` bytes long.
        unsafe { std::ptr::write_bytes(p.as_ptr(), 0, size) };
        Ok(p)
    }

    #[inline]
    pub(crate) fn ptr(&self, off: usize) -> NonNull<u8> {
        // SAFETY: `off` is inside the mapping, which is never at address 0.
        unsafe { NonNull::new_unchecked(self.inner.meta.mem.ptr(off)) }
    }

    #[inline(always)]
    fn alloc_off(&self, t: &ThreadLanes, size: usize, align: usize) -> Result<usize, AllocError> {
        // The fast path: a small block from this thread's lane cache. As in
        // `free_with`, the views are taken inside the gate.
        if align.is_power_of_two() && align <= 16 && size.wrapping_sub(1) < MAX_SMALL {
            if let Some(l) = t.last(self.inner.id) {
                let c = class_small(size);
                let m = &self.inner.meta;
                let inside = self.inner.gate.inside(l);
                let off = Self::pop_cached(c, m.mem, m.held_lane(l));
                drop(inside);
                if let Some(off) = off {
                    return Ok(off);
                }
                // The cache is empty: refill on the slow path.
            }
        }
        self.alloc_off_slow(t, size, align)
    }

    #[cold]
    #[inline(never)]
    fn alloc_off_slow(&self, t: &ThreadLanes, size: usize, align: usize) -> Result<usize, AllocError> {
        if !align.is_power_of_two() || align > PAGE_SIZE {
            return Err(AllocError::Alignment(align));
        }
        if size == 0 || size > self.size() as usize {
            return Err(AllocError::BadSize(size));
        }
        match class_for(size, align) {
            Some(c) => self.with_lane_in(t, |l| self.alloc_small(l, c)),
            None => self.with_lane_in(t, |_| self.alloc_large(size.div_ceil(PAGE_SIZE) as u64, None)),
        }
    }

    #[inline(always)]
    fn alloc_small(&self, l: u32, c: usize) -> Result<usize, AllocError> {
        let m = &self.inner.meta;
        self.pop(l, c, m.mem, m.lane(l))
    }

    /// Takes the top block of class `c` from lane `l`'s cache (`lane`),
    /// refilling it first when it is empty.
    #[inline(always)]
    fn pop(&self, l: u32, c: usize, mem: Mem, lane: &LaneWords) -> Result<usize, AllocError> {
        if lane.counts[c].load(Relaxed) == 0 {
            self.refill(l, c)?;
        }
        Ok(Self::pop_cached(c, mem, lane).expect("a refill leaves blocks in the cache"))
    }

    /// Takes the top block of class `c` from a lane's cache (`lane`);
    /// `None` (nothing done) when it is empty.
    #[inline(always)]
    fn pop_cached(c: usize, mem: Mem, lane: &LaneWords) -> Option<usize> {
        let count = &lane.counts[c];
        let n = count.load(Relaxed);
        if n == 0 {
            return None;
        }
        let off = (lane.entries[c][n as usize - 1].load(Relaxed) as usize) << 4;
        count.store(n - 1, Release);
        mem.u64(off + CANARY).store(0, Relaxed);
        Some(off)
    }

    fn oom(&self, size: usize) -> AllocError {
        AllocError::OutOfMemory { size, heap_size: self.size() }
    }

    /// Takes `npages` pages and publishes the run; with `intent`, records
    /// an `alloc_into` in lane `.0` to destination `.1` (kind `.2`) first.
    fn alloc_large(&self, npages: u64, intent: Option<(u32, usize, u64)>) -> Result<usize, AllocError> {
        let page = self.inner.pages.lock().take(npages).ok_or_else(|| self.oom(npages as usize * PAGE_SIZE))?;
        let off = Meta::page_off(page);
        let m = &self.inner.meta;
        // Interior hints, so that an address inside the run finds its head.
        for d in 1..npages {
            m.desc(page + d).store(Desc::Cont(d).encode(), Relaxed);
        }
        if let Some((l, dest, kind)) = intent {
            self.record_intent(l, off, dest, kind, npages);
        }
        m.desc(page).store(Desc::Large(npages).encode(), Release);
        Ok(off)
    }

    fn record_intent(&self, l: u32, block: usize, dest: usize, kind: u64, npages: u64) {
        let m = &self.inner.meta;
        m.lane_u64(l, lane::BLOCK).store(block as u64, Relaxed);
        m.lane_u64(l, lane::DEST).store(dest as u64, Relaxed);
        m.lane_u64(l, lane::DEST_KIND).store(kind, Relaxed);
        m.lane_u64(l, lane::PAGES).store(npages, Relaxed);
        m.lane_u64(l, lane::STATE).store(lane::ALLOC_INTO, Release);
    }

    /// Refills the empty cache of class `c` in lane `l`; returns its new count.
    #[cold]
    fn refill(&self, l: u32, c: usize) -> Result<u32, AllocError> {
        let m = &self.inner.meta;
        let cur = &self.inner.cur_slab[l as usize * NCLASSES + c];
        loop {
            let slab = cur.load(Relaxed);
            if slab != NO_SLAB {
                let n = self.claim(l, c, slab);
                if n > 0 {
                    return Ok(n);
                }
                // Exhausted: give it up. A free that saw us as the owner did
                // not list the slab, so look once more after letting go.
                m.slab_owner(slab).store(0, Release);
                cur.store(NO_SLAB, Relaxed);
                if self.has_free(slab, c) {
                    self.list(slab, c);
                }
            }
            let next = match self.take_partial(l, c) {
                Some(s) => s,
                None => self.new_slab(l, c)?,
            };
            cur.store(next, Relaxed);
        }
    }

    /// Claims up to a cache's worth of free blocks of the slab at `slab`
    /// (owned by lane `l`) into the lane's cache: the lowest free blocks,
    /// stored so that the cache hands them out in ascending address order
    /// (the lowest on top), as allocators do with fresh memory, which keeps
    /// data allocated together in the order hardware prefetchers follow.
    fn claim(&self, l: u32, c: usize, slab: u64) -> u32 {
        let m = &self.inner.meta;
        let info = &CLASSES[c];
        let count = m.cache_count(l, c);
        let n = count.load(Relaxed);
        let room = info.cache_cap.saturating_sub(n) as usize;
        // The blocks to take, lowest first, and the bits to set per word
        // (each word gives at least one block, so at most CACHE_CAP words).
        let mut offs = [0usize; CACHE_CAP];
        let mut words = [(0usize, 0u64); CACHE_CAP];
        let (mut k, mut nw) = (0usize, 0usize);
        let nwords = (info.nblocks as usize).div_ceil(64);
        for w in 0..nwords {
            if k == room {
                break;
            }
            let valid = if (w + 1) * 64 <= info.nblocks as usize {
                u64::MAX
            } else {
                (1u64 << (info.nblocks as usize % 64)) - 1
            };
            let mut free = !m.slab_word(slab, w).load(Acquire) & valid;
            let mut take = 0u64;
            while free != 0 && k < room {
                let b = free.trailing_zeros() as usize;
                free &= free - 1;
                take |= 1 << b;
                offs[k] = Meta::block_off(slab, info, w * 64 + b);
                k += 1;
            }
            if take != 0 {
                words[nw] = (w, take);
                nw += 1;
            }
        }
        // Highest first into the cache, so that pops (from the top) ascend.
        for (j, &off) in offs[..k].iter().rev().enumerate() {
            m.mem.u64(off + CANARY).store(self.canary(off), Relaxed);
            m.cache_entry(l, c, n as usize + j).store((off >> 4) as u32, Relaxed);
        }
        // Publish the entries, then claim: see the module docs.
        let n = n + k as u32;
        count.store(n, Release);
        for &(w, take) in &words[..nw] {
            m.slab_word(slab, w).fetch_or(take, AcqRel);
        }
        n
    }

    fn has_free(&self, slab: u64, c: usize) -> bool {
        let info = &CLASSES[c];
        let m = &self.inner.meta;
        let used: u32 =
            (0..(info.nblocks as usize).div_ceil(64)).map(|w| m.slab_word(slab, w).load(Acquire).count_ones()).sum();
        used < info.nblocks
    }

    fn list(&self, slab: u64, c: usize) {
        // Mostly listed already (every free into a slab another lane owns,
        // or none, comes here): a load first spares the frees a locked
        // swap. A `true` read here is a swap ordered before the one that
        // cleared it, which the partial lists' protocol allows already.
        let listed = &self.inner.listed[slab as usize];
        if !listed.load(Acquire) && !listed.swap(true, AcqRel) {
            self.inner.partial[c].lock().push(slab);
        }
    }

    fn take_partial(&self, l: u32, c: usize) -> Option<u64> {
        let m = &self.inner.meta;
        loop {
            let slab = self.inner.partial[c].lock().pop()?;
            self.inner.listed[slab as usize].store(false, Release);
            if m.slab_owner(slab).compare_exchange(0, u64::from(l) + 1, AcqRel, Acquire).is_err() {
                continue; // its owner lists it again when it lets go
            }
            if self.has_free(slab, c) {
                return Some(slab);
            }
            m.slab_owner(slab).store(0, Release);
            if self.has_free(slab, c) {
                self.list(slab, c);
            }
        }
    }

    fn new_slab(&self, l: u32, c: usize) -> Result<u64, AllocError> {
        let page = self.inner.pages.lock().take(SLAB_PAGES as u64).ok_or_else(|| self.oom(CLASSES[c].size as usize))?;
        let m = &self.inner.meta;
        m.slab_tag(page).store(slab::TAG, Relaxed);
        m.slab_class(page).store(c as u32, Relaxed);
        m.slab_owner(page).store(u64::from(l) + 1, Relaxed);
        for w in 0..(CLASSES[c].nblocks as usize).div_ceil(64) {
            m.slab_word(page, w).store(0, Relaxed);
        }
        for d in 1..SLAB_PAGES as u64 {
            m.desc(page + d).store(Desc::Cont(d).encode(), Relaxed);
        }
        m.desc(page).store(Desc::Slab(c as u8).encode(), Release);
        Ok(page)
    }

    /// The free canary of the block at `off` (stored at `off + CANARY`).
    #[inline]
    fn canary(&self, off: usize) -> u64 {
        self.inner.canary_key ^ off as u64
    }

    /// Frees a block this heap returned. Refuses (and changes nothing) for
    /// a pointer outside the heap, one that is not the start of a block,
    /// and a block that is already free (double frees are detected unless
    /// two threads free the same block at the same moment).
    #[inline]
    pub fn free(&self, ptr: NonNull<u8>) -> Result<()> {
        lanes::with_own(|t| self.free_with(t, ptr))
    }

    /// [`Heap::free`] with the caller's lane cache `lanes` (see
    /// [`Heap::alloc_in`]).
    ///
    /// # Safety
    ///
    /// As [`Heap::alloc_in`].
    #[inline(always)]
    pub unsafe fn free_in(&self, lanes: &ThreadLanes, ptr: NonNull<u8>) -> Result<()> {
        self.free_with(lanes, ptr)
    }

    #[inline(always)]
    fn free_with(&self, t: &ThreadLanes, ptr: NonNull<u8>) -> Result<()> {
        // The fast path: a block of a live slab, into this thread's lane
        // cache. `block_at` refuses offsets outside the heap's data pages.
        // Everything is computed inside the gate: values computed before it
        // would live across its fence, in more registers than there are.
        // No cached lane (a forked child has none: see `fork.rs`): the slow
        // path, which refuses an inherited heap before touching its memory.
        if let Some(l) = t.last(self.inner.id) {
            // The gate by hand: through `in_gate`'s closure the compiler
            // sometimes leaves this path out of line.
            let inside = self.inner.gate.inside(l);
            let fast = self.free_cached(l, ptr);
            drop(inside);
            match fast {
                Some((true, ..)) => return Ok(()),
                // The cache is full, or the block looks free.
                Some((false, off, slab, c, idx)) => return self.free_full(l, off, slab, c, idx),
                None => {}
            }
        }
        self.free_slow(t, ptr)
    }

    /// The fast path of [`Heap::free`] on lane `l`, inside the gate: the
    /// block's (pushed into the cache, offset, slab, class, index), or
    /// `None` when the pointer is not a block of a live slab.
    #[inline(always)]
    fn free_cached(&self, l: u32, ptr: NonNull<u8>) -> Option<(bool, usize, u64, usize, usize)> {
        let m = &self.inner.meta;
        let off = (ptr.as_ptr() as usize).wrapping_sub(m.mem.ptr(0) as usize);
        let (slab, c, idx) = m.block_at(off)?;
        let word = m.block_word(slab, idx);
        let bit = 1u64 << (idx % 64);
        let canary_word = m.mem.u64(off + CANARY);
        let pushed = Self::push_cached(off, c, (word, bit), (canary_word, self.canary(off)), m.held_lane(l));
        Some((pushed, off, slab, c, idx))
    }

    #[cold]
    #[inline(never)]
    fn free_slow(&self, t: &ThreadLanes, ptr: NonNull<u8>) -> Result<()> {
        let p = ptr.as_ptr() as usize;
        let off = self.offset_of(ptr.as_ptr()).ok_or(PointerError::NotInHeap(p))?;
        self.with_lane_in(t, |l| self.free_slow_in(l, off, p))
    }

    /// `free` on lane `l` (held by the caller).
    fn free_slow_in(&self, l: u32, off: usize, p: usize) -> Result<()> {
        match self.inner.meta.locate(off) {
            Located::Block { slab, class, idx } => self.free_small(l, off, slab, class, idx),
            Located::Large { page, npages } => self.free_large(page, npages, p),
            Located::Nothing
                if off.is_multiple_of(PAGE_SIZE)
                    && self.inner.meta.desc_of((off / PAGE_SIZE) as u64) == Some(Desc::Free) =>
            {
                Err(PointerError::DoubleFree(p))
            }
            Located::Outside | Located::Nothing => Err(PointerError::NotABlock(p)),
        }
        .map_err(Error::from)
    }

    /// Frees block `idx` (at heap offset `off`) of class `c` of the slab
    /// at page `slab` into lane `l`'s cache, or into the slab when the
    /// cache is full (see [`Heap::push`]).
    fn free_small(&self, l: u32, off: usize, slab: u64, c: usize, idx: usize) -> Result<(), PointerError> {
        let m = &self.inner.meta;
        let bit = (m.slab_word(slab, idx / 64), 1u64 << (idx % 64));
        self.push(l, off, slab, c, bit, (m.mem.u64(off + CANARY), self.canary(off)), m.lane(l))
    }

    /// Frees the block at heap offset `off` (class `c`, slab at page
    /// `slab`, its bitmap word and bit, its canary word and canary) into
    /// lane `l`'s cache (`lane`), or into its slab when the cache is full;
    /// refuses a block whose bit is clear (free, never allocated) or that
    /// carries the free canary (cached as free).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        l: u32,
        off: usize,
        slab: u64,
        c: usize,
        (word, bit): (&AtomicU64, u64),
        (canary_word, canary): (&AtomicU64, u64),
        lane: &LaneWords,
    ) -> Result<(), PointerError> {
        if Self::push_cached(off, c, (word, bit), (canary_word, canary), lane) {
            return Ok(());
        }
        if word.load(Relaxed) & bit == 0 || canary_word.load(Relaxed) == canary {
            return Err(self.double_free(off));
        }
        self.push_to_slab(l, off, slab, c, (word, bit))
    }

    /// The fast part of [`Heap::push`]: pushes the block into the cache
    /// when its bit is set, it carries no canary and the cache has room;
    /// false (nothing done) otherwise.
    #[inline(always)]
    fn push_cached(
        off: usize,
        c: usize,
        (word, bit): (&AtomicU64, u64),
        (canary_word, canary): (&AtomicU64, u64),
        lane: &LaneWords,
    ) -> bool {
        let count = &lane.counts[c];
        let n = count.load(Relaxed);
        if word.load(Relaxed) & bit == 0 || canary_word.load(Relaxed) == canary || n >= CLASSES[c].cache_cap {
            return false;
        }
        canary_word.store(canary, Relaxed);
        lane.entries[c][n as usize].store((off >> 4) as u32, Relaxed);
        count.store(n + 1, Release);
        true
    }

    /// After [`Heap::push_cached`] failed: frees the block into its slab
    /// when the cache is full, or says what is wrong with it.
    #[cold]
    #[inline(never)]
    fn free_full(&self, l: u32, off: usize, slab: u64, c: usize, idx: usize) -> Result<()> {
        self.in_gate(l, |l| self.free_small(l, off, slab, c, idx)).map_err(Error::from)
    }

    #[cold]
    fn push_to_slab(
        &self,
        l: u32,
        off: usize,
        slab: u64,
        c: usize,
        (word, bit): (&AtomicU64, u64),
    ) -> Result<(), PointerError> {
        if word.fetch_and(!bit, AcqRel) & bit == 0 {
            return Err(self.double_free(off));
        }
        if self.inner.meta.slab_owner(slab).load(Acquire) != u64::from(l) + 1 {
            self.list(slab, c);
        }
        Ok(())
    }

    #[cold]
    fn double_free(&self, off: usize) -> PointerError {
        PointerError::DoubleFree(self.inner.meta.mem.ptr(off) as usize)
    }

    fn free_large(&self, page: u64, npages: u64, p: usize) -> Result<(), PointerError> {
        let d = self.inner.meta.desc(page);
        if d.compare_exchange(Desc::Large(npages).encode(), Desc::Free.encode(), AcqRel, Acquire).is_err() {
            return Err(PointerError::DoubleFree(p));
        }
        self.inner.pages.lock().insert(page, npages);
        Ok(())
    }

    /// Bytes usable in the block at `ptr` (at least what was asked for).
    pub fn usable_size(&self, ptr: NonNull<u8>) -> Result<usize> {
        self.inner.owner.check()?;
        let p = ptr.as_ptr() as usize;
        let off = self.offset_of(ptr.as_ptr()).ok_or(PointerError::NotInHeap(p))?;
        let m = &self.inner.meta;
        match m.locate(off) {
            Located::Block { slab, class, idx } => {
                if m.slab_word(slab, idx / 64).load(Relaxed) & (1 << (idx % 64)) == 0
                    || m.mem.u64(off + CANARY).load(Relaxed) == self.canary(off)
                {
                    return Err(PointerError::DoubleFree(p).into());
                }
                Ok(CLASSES[class].size as usize)
            }
            Located::Large { npages, .. } => Ok(npages as usize * PAGE_SIZE),
            Located::Outside | Located::Nothing => Err(PointerError::NotABlock(p).into()),
        }
    }

    /// Resizes the block at `ptr` to `size` bytes, moving it when it must
    /// (then the old block is freed). Not failure-atomic: use a transaction
    /// when the move must be.
    pub fn realloc(&self, ptr: NonNull<u8>, size: usize) -> Result<NonNull<u8>> {
        let have = self.usable_size(ptr)?;
        if size <= have && size > have / 2 {
            return Ok(ptr);
        }
        let new = self.alloc(size)?;
        // SAFETY: both blocks are live, distinct, and at least
        // `min(have, size)` bytes long.
        unsafe { std::ptr::copy_nonoverlapping(ptr.as_ptr(), new.as_ptr(), have.min(size)) };
        self.free(ptr)?;
        Ok(new)
    }

    fn check_dest(&self, dest: usize) -> Result<usize, AllocError> {
        match self.offset_of(dest as *const u8) {
            Some(off) if off % 8 == 0 && off >= self.inner.header.layout.data_off as usize => Ok(off),
            _ => Err(AllocError::BadDestination(dest)),
        }
    }

    /// Allocates `size` bytes and stores the block's address in `*dest`, a
    /// word inside the heap's data area, in one failure-atomic step: after
    /// any crash, the block is allocated iff `*dest` points to it.
    pub fn alloc_into(&self, dest: *mut *mut u8, size: usize) -> Result<NonNull<u8>> {
        let d = self.check_dest(dest as usize)?;
        let off = self.alloc_into_off(d, lane::DEST_RAW, size, false)?;
        Ok(self.ptr(off))
    }

    /// Like [`Heap::alloc_into`] for an offset pointer destination.
    pub fn alloc_into_pptr<T>(&self, dest: *mut crate::PPtr<T>, size: usize) -> Result<crate::PPtr<T>> {
        let d = self.check_dest(dest as usize)?;
        let off = self.alloc_into_off(d, lane::DEST_OFFSET, size, false)?;
        Ok(crate::PPtr::from_offset(off as u64))
    }

    fn alloc_into_off(&self, dest: usize, kind: u64, size: usize, zero: bool) -> Result<usize, AllocError> {
        self.with_lane(|l| self.alloc_into_off_lane(l, dest, kind, size, zero))
    }

    /// `alloc_into` on lane `l` (held by the caller) to the word at heap offset `dest`.
    pub(crate) fn alloc_into_off_lane(
        &self,
        l: u32,
        dest: usize,
        kind: u64,
        size: usize,
        zero: bool,
    ) -> Result<usize, AllocError> {
        if size == 0 || size > self.size() as usize {
            return Err(AllocError::BadSize(size));
        }
        let m = &self.inner.meta;
        {
            let off = match class_for(size, 16) {
                Some(c) => {
                    let count = m.cache_count(l, c);
                    let mut n = count.load(Relaxed);
                    if n == 0 {
                        n = self.refill(l, c)?;
                    }
                    let off = (m.cache_entry(l, c, n as usize - 1).load(Relaxed) as usize) << 4;
                    if zero {
                        m.mem.fill(off, 0, CLASSES[c].size as usize);
                    }
                    self.record_intent(l, off, dest, kind, 0);
                    count.store(n - 1, Release);
                    m.mem.u64(off + CANARY).store(0, Relaxed);
                    off
                }
                None => {
                    let npages = size.div_ceil(PAGE_SIZE) as u64;
                    let off = self.alloc_large(npages, Some((l, dest, kind)))?;
                    if zero {
                        m.mem.fill(off, 0, npages as usize * PAGE_SIZE);
                    }
                    off
                }
            };
            let value = if kind == lane::DEST_RAW { m.recorded_base + off as u64 } else { off as u64 };
            m.mem.u64(dest).store(value, Release);
            m.lane_u64(l, lane::STATE).store(lane::IDLE, Release);
            Ok(off)
        }
    }

    /// The heap's process-unique id (lane caches are keyed by it).
    #[cfg(test)]
    pub(crate) fn inner_id(&self) -> u64 {
        self.inner.id
    }

    pub(crate) fn meta(&self) -> &Meta {
        &self.inner.meta
    }

    /// The volatile transaction state of lane `l`, which the calling
    /// thread holds (its private lane; the tx functions get `l` from
    /// [`Heap::private_lane`] or a `Tx`, which cannot leave its thread).
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn txv(&self, l: u32) -> &mut crate::tx::TxVolatile {
        debug_assert_ne!(l, 0, "transactions never use the shared lane");
        // SAFETY: a private lane is held by exactly one thread at a time
        // (lanes.rs), only that thread calls this for it, and the tx code
        // never holds two of these references at once (each call's borrow
        // ends before the next is taken).
        unsafe { self.inner.txv[l as usize].0.get() }
    }

    pub(crate) fn nlanes(&self) -> u32 {
        self.inner.header.layout.nlanes
    }

    /// This thread's private lane (taken now if need be); `None` when only
    /// the shared lane is left; `Err` in a forked child (the lane cache is
    /// empty there, so the check costs nothing on the cached path).
    pub(crate) fn private_lane(&self) -> Result<Option<u32>, Forked> {
        lanes::with_own(|t| self.private_lane_in(t))
    }

    /// [`Heap::private_lane`] with the lane cache `t`, a thread-local of
    /// this thread without destructor (see [`lanes::acquire`]).
    #[inline]
    pub(crate) fn private_lane_in(&self, t: &ThreadLanes) -> Result<Option<u32>, Forked> {
        let l = match t.last(self.inner.id) {
            Some(l) => l,
            None => self.private_lane_slow(t)?,
        };
        Ok((l != 0).then_some(l))
    }

    #[cold]
    #[inline(never)]
    fn private_lane_slow(&self, t: &ThreadLanes) -> Result<u32, Forked> {
        self.inner.owner.check()?;
        let home: Arc<dyn HasLanes> = self.inner.clone();
        // SAFETY: as in `with_lane_slow`.
        Ok(unsafe { lanes::acquire(self.inner.id, &home, t) })
    }

    /// `Err` when this process is a fork of the one that opened the heap
    /// (see [`crate::fork`]): then every call on the heap fails with
    /// [`Forked`] (or, for the few with no error to return, panics), raw
    /// accesses to its memory fault, and dropping it releases nothing.
    /// Transaction calls use it too (one load and compare; a transaction
    /// that began before `fork()` is refused there).
    #[inline]
    pub fn check_process(&self) -> Result<(), Forked> {
        self.inner.owner.check()
    }

    /// Calls without an error return: panic in a forked child.
    #[track_caller]
    fn not_forked(&self) {
        if let Err(e) = self.inner.owner.check() {
            panic!("remem: {e}");
        }
    }

    /// Puts the allocated small block at `off` into lane `l`'s cache if
    /// there is room; false (nothing done) otherwise.
    pub(crate) fn push_to_cache(&self, l: u32, off: usize) -> bool {
        let m = &self.inner.meta;
        let Located::Block { class: c, .. } = m.locate(off) else { return false };
        let count = m.cache_count(l, c);
        let n = count.load(Relaxed);
        if n >= CLASSES[c].cache_cap {
            return false;
        }
        m.mem.u64(off + CANARY).store(self.canary(off), Relaxed);
        m.cache_entry(l, c, n as usize).store((off >> 4) as u32, Relaxed);
        count.store(n + 1, Release);
        true
    }

    /// The root object, if one was set.
    ///
    /// # Panics
    /// In a forked child, on a heap the parent opened (see [`crate::fork`]).
    pub fn root(&self) -> Option<NonNull<u8>> {
        self.not_forked();
        let r = self.inner.meta.root().load(Acquire);
        NonNull::new(r as *mut u8)
    }

    /// Makes the block at `ptr` the root object (or clears the root).
    pub fn set_root(&self, ptr: Option<NonNull<u8>>) -> Result<()> {
        if let Some(p) = ptr {
            self.usable_size(p)?;
        }
        self.with_lane(|_| {
            self.inner.meta.root().store(ptr.map_or(0, |p| p.as_ptr() as u64), Release);
            Ok(())
        })
    }

    /// The root object; when there is none, allocates `size` zeroed bytes
    /// and makes them the root in one failure-atomic step. The bool is true
    /// when the root was created by this call.
    pub fn root_or_alloc(&self, size: usize) -> Result<(NonNull<u8>, bool)> {
        self.inner.owner.check()?;
        let _g = self.inner.root_lock.lock();
        if let Some(r) = self.root() {
            return Ok((r, false));
        }
        let off = self.alloc_into_off(hdr::ROOT, lane::DEST_RAW, size, true)?;
        Ok((self.ptr(off), true))
    }

    /// Validates every allocator invariant. Call it while no other thread
    /// uses the heap; concurrent changes may be reported as problems.
    /// In a forked child, on a heap the parent opened, the report has one
    /// problem that says so (see [`crate::fork`]).
    pub fn check(&self) -> CheckReport {
        if let Err(e) = self.inner.owner.check() {
            return CheckReport::refused(e.to_string());
        }
        let pages = self.inner.pages.lock();
        crate::check::check(&self.inner.meta, Some(LiveState { pages: &pages }), None)
    }

    /// [`Heap::check`], plus a leak check: `live` lists every block the
    /// caller holds; allocated blocks not in it (nor the root) are reported
    /// as leaked, and pointers named twice or not allocated as doubly owned.
    pub fn check_live(&self, live: impl IntoIterator<Item = *const u8>) -> CheckReport {
        if let Err(e) = self.inner.owner.check() {
            return CheckReport::refused(e.to_string());
        }
        let base = self.base() as usize;
        let mut live: Vec<u64> = live.into_iter().map(|p| (p as usize).wrapping_sub(base) as u64).collect();
        live.extend(crate::tx::log_blocks(&self.inner.meta));
        let pages = self.inner.pages.lock();
        crate::check::check(&self.inner.meta, Some(LiveState { pages: &pages }), Some(&live))
    }

    /// Statistics of the allocator.
    ///
    /// # Panics
    /// In a forked child, on a heap the parent opened (see [`crate::fork`]).
    pub fn stats(&self) -> HeapStats {
        self.not_forked();
        let pages = self.inner.pages.lock();
        HeapStats {
            size: self.size(),
            data_pages: self.inner.header.layout.npages() - self.inner.header.layout.first_data_page(),
            free_pages: pages.free_pages(),
            largest_free_run: pages.largest(),
        }
    }
}

/// Allocator statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeapStats {
    /// Heap size in bytes.
    pub size: u64,
    /// Pages available for data.
    pub data_pages: u64,
    /// Pages in no slab or run.
    pub free_pages: u64,
    /// Longest run of free pages.
    pub largest_free_run: u64,
}

impl Drop for Heap {
    fn drop(&mut self) {
        if self.inner.owner.inherited() {
            return self.forget_inherited();
        }
        let handle = self.registered.is_some();
        if let Some(twin) = self.registered.take() {
            let addr = &*twin as *const Heap as usize;
            OPEN.write().retain(|&(_, a)| a != addr);
        }
        if !self.closed {
            if let Err(e) = self.finish() {
                eprintln!(
                    "remem: heap {} dropped without close(), and its final flush failed: {e}",
                    self.inner.path.as_deref().unwrap_or(Path::new("<memfd>")).display()
                );
            }
        } else if let Some(d) = &self.inner.durability {
            d.stop();
        }
        if let (true, Some(l)) = (handle, self.inner.lazy.get()) {
            l.stop();
        }
    }
}

impl Heap {
    /// Drop of a heap inherited across fork(), in the child: releases
    /// nothing. The mapping is not in this process (and its address range
    /// may hold a mapping the child made since), the flusher and tracker
    /// threads do not exist here, and the files, lock and baseline belong
    /// to the parent: the shared state is leaked, only the registry entry
    /// is removed (if its lock is free: another thread of the parent may
    /// have held it at the fork).
    #[cold]
    fn forget_inherited(&mut self) {
        std::mem::forget(self.inner.clone());
        if let Some(twin) = self.registered.take() {
            let addr = &*twin as *const Heap as usize;
            if let Some(mut open) = OPEN.try_write() {
                open.retain(|&(_, a)| a != addr);
            }
            std::mem::forget(twin);
        }
    }
}

impl Inner {
    fn flush(&self) -> Result<u64, FlushError> {
        let d = self.durability.as_ref().ok_or(FlushError::NoBaseline)?;
        if let Some(l) = self.lazy.get() {
            l.wait_committable()?;
        }
        d.flush(self.region.base(), &self.gate)
    }
}

/// Runs recovery on a heap image held in memory (for example a copy of a
/// heap's memory taken at some instant) and returns what it did; the image
/// is repaired in place. The image may sit at any address.
pub fn recover_image(image: &mut [u64]) -> Result<RecoveryReport, OpenError> {
    let meta = image_meta(image)?;
    recover(&meta).map(|(r, _)| r).map_err(|reason| OpenError::Corrupt { path: "<image>".into(), reason })
}

/// Checks a (recovered) heap image in memory; see [`Heap::check`]. With
/// `live` (heap offsets of every block the caller's data references) it
/// also reports leaked and doubly-owned blocks, as [`Heap::check_live`].
pub fn check_image(image: &mut [u64], live: Option<&[u64]>) -> Result<CheckReport, OpenError> {
    let meta = image_meta(image)?;
    let live = live.map(|l| {
        let mut l = l.to_vec();
        l.extend(crate::tx::log_blocks(&meta));
        l
    });
    Ok(crate::check::check(&meta, None, live.as_deref()))
}

/// The base address recorded in a heap image's header: raw pointers stored
/// in the image are relative to it.
pub fn image_base(image: &mut [u64]) -> Result<u64, OpenError> {
    Ok(image_meta(image)?.recorded_base)
}

fn image_meta(image: &mut [u64]) -> Result<Meta, OpenError> {
    let bytes = image.len() * 8;
    if bytes < PAGE_SIZE {
        return Err(OpenError::Corrupt { path: "<image>".into(), reason: format!("image is only {bytes} bytes") });
    }
    // SAFETY: `image` is an exclusively borrowed, 8-aligned buffer of
    // `bytes` bytes that outlives the returned view's uses in the callers.
    let mem = unsafe { Mem::new(image.as_mut_ptr().cast(), bytes) };
    let mut first = vec![0u8; (hdr::CRC + 4).min(bytes)];
    mem.read(0, &mut first);
    let header =
        Header::decode(&first).map_err(|e| OpenError::Corrupt { path: "<image>".into(), reason: e.to_string() })?;
    if header.layout.size as usize != bytes {
        return Err(OpenError::Corrupt {
            path: "<image>".into(),
            reason: format!("image is {bytes} bytes, its header says {}", header.layout.size),
        });
    }
    Ok(Meta::new(mem, &header))
}

/// Time marks of the steps of an open, for the debug log: each step's name
/// and the time since the open began when it ended.
#[derive(Default)]
struct Phases(Vec<(&'static str, Duration)>);

impl Phases {
    fn mark(&mut self, step: &'static str, t0: std::time::Instant) {
        self.0.push((step, t0.elapsed()));
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (step, at)) in self.0.iter().enumerate() {
            write!(f, "{}{step} at {:.1} ms", if i == 0 { "" } else { ", " }, at.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}
