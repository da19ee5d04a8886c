//! Transports: one-sided reads of a remote host's registered memory.
//!
//! A *target* (what the agent runs) registers read-only regions of memory it
//! keeps mapped and gets a [`RegionDesc`] (address, key, length) for each; it
//! listens on a TCP address for *initiators* (the recovering host). An
//! initiator connects with the shared [`Token`], receives the region
//! descriptors, posts batches of reads `(region, offset, len, local buffer)`
//! and polls their completions. There is no remote write: the target grants
//! remote *read* access only, and neither wire protocol has a write.
//!
//! ```text
//!             Target (trait)                          Initiator (trait)
//!   register(memory) -> RegionDesc          regions() -> [RegionDesc]
//!   deregister(rkey)                        alloc_buf(len) -> BufId, buf(id) -> &[u8]
//!   local_addr(), stats()                   post([ReadRequest]), poll(), wait()
//!        │                                            │
//!   ┌────┴──────────────┐                     ┌───────┴────────────┐
//!  TcpTarget      VerbsTarget                TcpInitiator    VerbsInitiator
//!   │  (feature `verbs`) │                     │                  │
//!   └─ server.rs: gate, handshake.rs ◀─────────┴── handshake.rs ──┘
//!      (a Noise handshake keyed by the token over the TCP control
//!       connection, channel.rs; then regions, and for verbs the queue-pair
//!       data, exchanged sealed; TCP data frames sealed too)
//! ```
//!
//! Both transports have the semantics of an RDMA reliable connection:
//! completions come back in posting order; a read with an unknown key or
//! outside its region completes with [`Status::AccessError`], the connection
//! enters the error state, and every read outstanding or posted after it
//! completes with [`Status::Flushed`]. Reads are not atomic and not cached:
//! a read returns what the memory holds when the target reads it. The
//! conformance suite (`tests.rs`) holds both transports to this. One
//! difference remains: a verbs peer that vanishes fails the reads after the
//! queue pair's retry timeout (about half a second), while a TCP target
//! that stops answering but keeps its socket open is noticed only through
//! [`Initiator::wait`]'s timeout; the caller then drops the initiator.
//!
//! Authentication and encryption: both sides hold the same 32-byte
//! [`Token`], from the `REMEM_TOKEN` environment variable or a file with
//! mode 0600 (never argv, never logged). The handshake is Noise
//! `NNpsk0_25519_AESGCM_SHA256` with a pre-shared key derived from the
//! token (`channel.rs`): a wrong token is an error on both sides and the
//! connection is closed; the session keys come from that handshake's fresh
//! Diffie-Hellman, and every byte after it (ACCEPT, the queue-pair data of
//! verbs, every TCP request and response) is sealed with AES-256-GCM and
//! numbered, so nobody on the path can read, alter, replay, reorder or
//! inject a frame, not even a relay that passed a genuine handshake
//! through. TCP responses also carry a CRC-32 of their data computed from
//! the source memory ([`Completion::crc`]). RDMA one-sided reads are not
//! encrypted (no NIC here can): the verbs transport authenticates its key
//! exchange the same way, and is for trusted fabrics only
//! (docs/security.md). A target listens on loopback unless told otherwise
//! ([`ServeOptions::listen`]), caps its connections, and gives a peer one
//! deadline for the whole handshake.
//!
//! Files: `region.rs` (descriptors, requests, completions), `memory.rs`
//! (what a target serves), `token.rs`, `channel.rs` (the Noise session),
//! `handshake.rs` (control messages, pure encoding plus the blocking
//! exchange), `wire.rs` (TCP data frames), `fuzzing.rs` (entry points of
//! the fuzz targets, also replayed as tests),
//! `ledger.rs` (queue depth and buffer accounting shared by both
//! initiators), `server.rs` (accept loop), `tcp/`, `verbs/` (every `unsafe`
//! of this crate), `bench.rs`, `error.rs`, `tests.rs`.
//!
//! Running the verbs conformance suite on an RDMA host (an HCA, or Soft-RoCE:
//! `modprobe rdma_rxe && rdma link add rxe0 type rxe netdev eth0`):
//! `cargo test -p remem-recovery --features verbs -- --ignored`
//! (`REMEM_RDMA_DEVICE` and `REMEM_RDMA_GID_INDEX` choose the device and GID).

mod bench;
mod channel;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod ledger;
mod memory;
mod region;
mod server;
pub mod tcp;
#[cfg(test)]
mod tests;
mod token;
#[cfg(feature = "verbs")]
#[allow(unsafe_code)]
pub mod verbs;
mod wire;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub use bench::{bench_pull, BenchOptions, BenchReport, Times};
pub use error::{
    BenchError, BufError, ConnectError, DeviceError, Error, PollError, PostError, RegisterError, Result, ServeError,
    TokenError,
};
pub use memory::{MemoryView, SharedBytes, SourceMemory};
pub use region::{BufId, Completion, ReadRequest, RegionDesc, Status, MAX_READ_LEN};
pub use token::Token;

/// The TCP port a target listens on when not told otherwise.
pub const DEFAULT_PORT: u16 = 7407;

/// The serving side: memory registered for remote reads, and a listener.
///
/// Dropping a target closes its listener and every connection; initiators
/// then see their outstanding reads fail.
pub trait Target: Send + Sync {
    /// Registers `memory` for remote reads only and returns what an
    /// initiator needs to read it. Initiators that connect afterwards
    /// receive it; connected ones can use it once they learn its descriptor.
    fn register(&self, memory: Arc<dyn SourceMemory>) -> Result<RegionDesc, RegisterError>;

    /// Withdraws a region: later reads of it are access errors.
    fn deregister(&self, rkey: u32) -> Result<(), RegisterError>;

    /// The address the listener is bound to (its port, when port 0 was asked).
    fn local_addr(&self) -> SocketAddr;

    /// Counters of connections, rejections and reads served.
    fn stats(&self) -> TargetStats;
}

/// The pulling side: one authenticated connection to a target.
///
/// Reads land in local buffers the initiator owns (registered with the
/// device, for verbs). A buffer can be looked at only while no read into it
/// is outstanding, which is what makes reading it safe while the device may
/// still be writing into others.
pub trait Initiator: Send {
    /// The regions the target announced when this connection was made.
    fn regions(&self) -> &[RegionDesc];

    /// Allocates a zeroed local buffer of `len` bytes for reads to land in.
    fn alloc_buf(&mut self, len: usize) -> Result<BufId, BufError>;

    /// The bytes of a buffer; `Busy` while reads into it are outstanding
    /// (posted and not yet returned by `poll` or `wait`).
    fn buf(&self, id: BufId) -> Result<&[u8], BufError>;

    /// Posts a batch of reads, all or none. Remote problems (bad key, out of
    /// range, connection lost) are not errors here: they come back as
    /// completions. Posting to a connection in the error state succeeds and
    /// the reads complete as [`Status::Flushed`].
    fn post(&mut self, reads: &[ReadRequest]) -> Result<(), PostError>;

    /// Appends up to `max` completions that are ready, without blocking, and
    /// returns how many it appended.
    fn poll(&mut self, out: &mut Vec<Completion>, max: usize) -> Result<usize, PollError>;

    /// Appends every ready completion, waiting up to `timeout` until there
    /// are at least `min`; returns how many it appended.
    fn wait(&mut self, out: &mut Vec<Completion>, min: usize, timeout: Duration) -> Result<usize, PollError>;

    /// How many reads may be posted and not yet polled.
    fn max_outstanding(&self) -> usize;
}

/// A target's counters, for tests and for the agent's status output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TargetStats {
    /// Connections that completed authentication.
    pub accepted: u64,
    /// Connections refused or dropped during the handshake (wrong token,
    /// wrong version or transport, malformed or silent peer).
    pub rejected: u64,
    /// Connections open now.
    pub active: u64,
    /// Reads answered with data (TCP only; on verbs the device answers).
    pub reads_served: u64,
    /// Reads refused as access errors (TCP only).
    pub access_errors: u64,
}

/// Which transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// TCP: runs anywhere; the target's threads answer the reads.
    Tcp,
    /// RDMA verbs (cargo feature `verbs`): the target's NIC answers the reads.
    Verbs,
}

impl Kind {
    /// The name used on command lines and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Verbs => "verbs",
        }
    }

    pub(crate) fn wire(self) -> u8 {
        match self {
            Kind::Tcp => 1,
            Kind::Verbs => 2,
        }
    }

    pub(crate) fn from_wire(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Tcp),
            2 => Some(Kind::Verbs),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Kind, String> {
        match s {
            "tcp" => Ok(Kind::Tcp),
            "verbs" | "rdma" => Ok(Kind::Verbs),
            _ => Err(format!("unknown transport {s:?}: expected \"tcp\" or \"verbs\"")),
        }
    }
}

/// Which RDMA device and GID the verbs transport uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceOptions {
    /// Device name (e.g. `mlx5_0`, `rxe0`); the first device when `None`.
    pub name: Option<String>,
    /// GID table index of port 1 (RoCE needs the one of the right IP version).
    pub gid_index: u8,
}

impl DeviceOptions {
    /// From `REMEM_RDMA_DEVICE` and `REMEM_RDMA_GID_INDEX`, if set.
    pub fn from_env() -> DeviceOptions {
        DeviceOptions {
            name: std::env::var("REMEM_RDMA_DEVICE").ok().filter(|s| !s.is_empty()),
            gid_index: std::env::var("REMEM_RDMA_GID_INDEX").ok().and_then(|s| s.parse().ok()).unwrap_or(0),
        }
    }
}

/// How a target serves.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServeOptions {
    /// Where to listen; `127.0.0.1:DEFAULT_PORT` unless told otherwise.
    pub listen: SocketAddr,
    /// The shared secret initiators must prove they hold.
    pub token: Token,
    /// Time a peer has to complete the whole handshake, from its connection.
    pub handshake_timeout: Duration,
    /// Authenticated connections served at once (each has a thread); more
    /// are refused as busy. Unauthenticated ones never get a thread.
    pub max_connections: usize,
    /// A connection whose peer accepts no data for this long is dropped.
    pub write_timeout: Duration,
    /// The RDMA device (verbs only).
    pub device: DeviceOptions,
}

impl ServeOptions {
    /// Loopback on [`DEFAULT_PORT`], default timeouts, device from the environment.
    pub fn new(token: Token) -> ServeOptions {
        ServeOptions {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_PORT)),
            token,
            handshake_timeout: Duration::from_secs(10),
            max_connections: 64,
            write_timeout: Duration::from_secs(60),
            device: DeviceOptions::from_env(),
        }
    }

    /// Listen on `addr` instead of loopback.
    pub fn listen(mut self, addr: SocketAddr) -> ServeOptions {
        self.listen = addr;
        self
    }

    /// Use this RDMA device (verbs only).
    pub fn device(mut self, device: DeviceOptions) -> ServeOptions {
        self.device = device;
        self
    }
}

/// How an initiator connects.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// The target's listener.
    pub addr: SocketAddr,
    /// The shared secret.
    pub token: Token,
    /// Reads that may be posted and not yet polled.
    pub depth: usize,
    /// Time allowed for the TCP connection and the whole handshake.
    pub timeout: Duration,
    /// The RDMA device (verbs only).
    pub device: DeviceOptions,
}

impl ConnectOptions {
    /// Depth 2048, 10 s to connect, device from the environment. Over TCP,
    /// keep more bytes in flight than the socket buffers hold (4 MiB): with
    /// 4 KiB reads, this depth, posted in batches into several buffers.
    /// Verbs caps the depth at the device's send-queue limit.
    pub fn new(addr: SocketAddr, token: Token) -> ConnectOptions {
        ConnectOptions { addr, token, depth: 2048, timeout: Duration::from_secs(10), device: DeviceOptions::from_env() }
    }

    /// Allow `depth` reads outstanding (at least 1).
    pub fn depth(mut self, depth: usize) -> ConnectOptions {
        self.depth = depth.max(1);
        self
    }

    /// Use this RDMA device (verbs only).
    pub fn device(mut self, device: DeviceOptions) -> ConnectOptions {
        self.device = device;
        self
    }
}

/// Starts a target of the given kind.
pub fn serve(kind: Kind, opts: ServeOptions) -> Result<Box<dyn Target>, ServeError> {
    match kind {
        Kind::Tcp => Ok(Box::new(tcp::TcpTarget::serve(opts)?)),
        #[cfg(feature = "verbs")]
        Kind::Verbs => Ok(Box::new(verbs::VerbsTarget::serve(opts)?)),
        #[cfg(not(feature = "verbs"))]
        Kind::Verbs => Err(ServeError::Device(DeviceError::NotBuilt)),
    }
}

/// Connects an initiator of the given kind.
pub fn connect(kind: Kind, opts: &ConnectOptions) -> Result<Box<dyn Initiator>, ConnectError> {
    match kind {
        Kind::Tcp => Ok(Box::new(tcp::TcpInitiator::connect(opts)?)),
        #[cfg(feature = "verbs")]
        Kind::Verbs => Ok(Box::new(verbs::VerbsInitiator::connect(opts)?)),
        #[cfg(not(feature = "verbs"))]
        Kind::Verbs => Err(ConnectError::Device(DeviceError::NotBuilt)),
    }
}
