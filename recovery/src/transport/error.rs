//! Errors of the transports, one enum per operation, and the module's
//! `Result` alias. No message ever contains a token.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::region::{BufId, Status};

/// `Result` with the transport's [`Error`] unless told otherwise.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Any transport error, for callers that do not tell them apart.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Starting a target failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Connecting an initiator failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// Registering or withdrawing a region failed.
    #[error(transparent)]
    Register(#[from] RegisterError),
    /// A batch of reads was not posted.
    #[error(transparent)]
    Post(#[from] PostError),
    /// Polling for completions failed.
    #[error(transparent)]
    Poll(#[from] PollError),
    /// A local buffer could not be allocated or looked at.
    #[error(transparent)]
    Buf(#[from] BufError),
    /// No usable token.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The pull benchmark failed.
    #[error(transparent)]
    Bench(#[from] BenchError),
}

/// Why the RDMA device cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// This build has no verbs transport.
    #[error(
        "remem was built without the verbs transport: rebuild with `--features verbs` (needs the \
         Debian packages libibverbs-dev, librdmacm-dev, libclang-dev), or use the TCP transport"
    )]
    NotBuilt,
    /// `ibv_get_device_list` failed with ENOSYS: the kernel has no RDMA support.
    #[error(
        "this kernel has no RDMA support (ibv_get_device_list failed with ENOSYS): load the RDMA \
         modules (`modprobe ib_uverbs` and your NIC's driver, or Soft-RoCE: `modprobe rdma_rxe && \
         rdma link add rxe0 type rxe netdev <interface>`), or use the TCP transport"
    )]
    NoKernelSupport,
    /// The kernel supports RDMA but no (matching) device exists.
    #[error(
        "no RDMA device{}: found {found:?}; check `ibv_devices` or `rdma link`, set \
         REMEM_RDMA_DEVICE to one of the found devices, or use the TCP transport",
        wanted.as_ref().map(|w| format!(" named {w:?}")).unwrap_or_default()
    )]
    NoDevice {
        /// The device asked for, if any.
        wanted: Option<String>,
        /// The devices that exist.
        found: Vec<String>,
    },
    /// The device's port 1 is not active.
    #[error("port {port} of RDMA device {device} is not active (state {state}); check the link with `ibv_devinfo`")]
    PortDown {
        /// The device.
        device: String,
        /// The port.
        port: u8,
        /// `ibv_port_state` code (4 is ACTIVE).
        state: u32,
    },
    /// A verbs call failed.
    #[error("{what}: {source}")]
    Call {
        /// The call and what it was for.
        what: &'static str,
        /// The errno it left.
        source: io::Error,
    },
}

/// Why a target could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the operating system said.
        source: io::Error,
    },
    /// Another operating-system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What the target was doing.
        what: &'static str,
        /// What the operating system said.
        source: io::Error,
    },
    /// The RDMA device cannot be used.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// Why an initiator could not connect.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The TCP connection failed.
    #[error("cannot connect to the target at {addr}: {source}")]
    Connect {
        /// The target's address.
        addr: SocketAddr,
        /// What the operating system said.
        source: io::Error,
    },
    /// The handshake's I/O failed (including its timeout).
    #[error("handshake with {addr}: {what}: {source}")]
    Io {
        /// The target's address.
        addr: SocketAddr,
        /// The step that failed.
        what: &'static str,
        /// What the operating system said.
        source: io::Error,
    },
    /// The two sides hold different tokens.
    #[error(
        "authentication with {addr} failed: the target and this host hold different tokens; give \
         both the same token (REMEM_TOKEN, or a token file of mode 0600 named by REMEM_TOKEN_FILE)"
    )]
    AuthFailed {
        /// The target's address.
        addr: SocketAddr,
    },
    /// The target refused the connection for another reason.
    #[error("the target at {addr} refused the connection: {reason}")]
    Rejected {
        /// The target's address.
        addr: SocketAddr,
        /// What the target said.
        reason: String,
    },
    /// A handshake or channel message from the target failed authentication:
    /// something on the path altered, replayed or injected bytes (the
    /// target itself proved it holds the token).
    #[error("the connection to {addr} was tampered with: {what}")]
    Tampered {
        /// The target's address.
        addr: SocketAddr,
        /// What failed.
        what: String,
    },
    /// The peer broke the protocol.
    #[error("the peer at {addr} does not speak remem's transport protocol: {what}")]
    Protocol {
        /// The target's address.
        addr: SocketAddr,
        /// What was wrong.
        what: String,
    },
    /// The RDMA device cannot be used.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// Why a region could not be registered or withdrawn.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The memory is empty.
    #[error("cannot register an empty region")]
    Empty,
    /// No region has this key.
    #[error("no region is registered with key {0:#x}")]
    UnknownKey(u32),
    /// The operating system gave no random bytes for the key.
    #[error("no random bytes for a region key: {0}")]
    Random(String),
    /// The device refused the registration.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// Why a batch of reads was not posted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostError {
    /// A read of zero bytes.
    #[error("read {wr_id} has length 0")]
    ZeroLength {
        /// The read's `wr_id`.
        wr_id: u64,
    },
    /// A read longer than [`MAX_READ_LEN`](super::MAX_READ_LEN).
    #[error("read {wr_id} of {len} bytes is longer than the {max}-byte limit")]
    TooLong {
        /// The read's `wr_id`.
        wr_id: u64,
        /// Its length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A read names a buffer this initiator did not allocate.
    #[error("read {wr_id} names unknown local buffer {buf:?}")]
    UnknownBuf {
        /// The read's `wr_id`.
        wr_id: u64,
        /// The buffer it named.
        buf: BufId,
    },
    /// A read does not fit in its local buffer.
    #[error("read {wr_id} of {len} bytes at offset {offset} does not fit local buffer {buf:?} of {buf_len} bytes")]
    LocalRange {
        /// The read's `wr_id`.
        wr_id: u64,
        /// The buffer.
        buf: BufId,
        /// Offset in the buffer.
        offset: usize,
        /// The read's length.
        len: u32,
        /// The buffer's length.
        buf_len: usize,
    },
    /// The batch would exceed the queue depth: poll completions first.
    #[error("{outstanding} reads are outstanding and the batch adds {batch}, over the depth of {depth}; poll first")]
    QueueFull {
        /// Reads posted and not yet polled.
        outstanding: usize,
        /// Reads in the refused batch.
        batch: usize,
        /// The connection's depth.
        depth: usize,
    },
    /// `ibv_post_send` refused a request; the ones before it were posted and will complete.
    #[error("the device refused read {refused} of the batch (the {refused} before it were posted): {source}")]
    Device {
        /// Index in the batch of the refused read (= how many were posted).
        refused: usize,
        /// The device's error.
        source: DeviceError,
    },
}

/// Why polling failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PollError {
    /// `wait` ran out of time.
    #[error("only {got} of {wanted} completions arrived in {waited:?}")]
    Timeout {
        /// Completions appended before the deadline.
        got: usize,
        /// Completions waited for.
        wanted: usize,
        /// The timeout.
        waited: Duration,
    },
    /// `wait` was asked for more completions than there are reads outstanding.
    #[error("cannot wait for {wanted} completions: only {outstanding} reads are outstanding")]
    NotOutstanding {
        /// Completions waited for.
        wanted: usize,
        /// Reads posted and not yet polled.
        outstanding: usize,
    },
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What the initiator was doing.
        what: &'static str,
        /// What the operating system said.
        source: io::Error,
    },
    /// The device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// Why a local buffer could not be allocated or looked at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BufError {
    /// This initiator did not allocate the buffer.
    #[error("unknown local buffer {0:?}")]
    Unknown(BufId),
    /// Reads into the buffer are outstanding.
    #[error("local buffer {buf:?} has {outstanding} reads outstanding; poll their completions first")]
    Busy {
        /// The buffer.
        buf: BufId,
        /// Reads into it posted and not yet polled.
        outstanding: usize,
    },
    /// A zero-length buffer, or one too large to allocate.
    #[error("cannot allocate a local buffer of {len} bytes")]
    BadLength {
        /// The length asked for.
        len: usize,
    },
    /// The device refused to register the buffer.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// Why no token could be had. Messages name where the token came from,
/// never its value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Neither `REMEM_TOKEN` nor `REMEM_TOKEN_FILE` is set.
    #[error(
        "no transport token: set REMEM_TOKEN to the token's 64 hex digits, or REMEM_TOKEN_FILE to a \
         file of mode 0600 that holds them (`remem` can generate one)"
    )]
    Missing,
    /// The token is not 64 hex digits.
    #[error("the token from {origin} is not 64 hex digits")]
    Malformed {
        /// Where it came from (`REMEM_TOKEN` or the file's path).
        origin: String,
    },
    /// The token file is readable or writable by group or others.
    #[error("token file {path} has mode {mode:o}: group and others must have no access; run `chmod 600 {path}`")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The token file could not be read or written.
    #[error("token file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The operating system gave no random bytes.
    #[error("no random bytes from the operating system: {0}")]
    Random(String),
}

/// Why the pull benchmark failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// Bad options.
    #[error("bad benchmark options: {0}")]
    Options(&'static str),
    /// The target failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The initiator failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// Registering the source failed.
    #[error(transparent)]
    Register(#[from] RegisterError),
    /// Allocating a landing buffer failed.
    #[error(transparent)]
    Buf(#[from] BufError),
    /// Posting failed.
    #[error(transparent)]
    Post(#[from] PostError),
    /// Polling failed.
    #[error(transparent)]
    Poll(#[from] PollError),
    /// A read did not succeed.
    #[error("read {wr_id} ended with {status:?}")]
    Read {
        /// The read.
        wr_id: u64,
        /// How it ended.
        status: Status,
    },
    /// The pulled bytes differ from the source.
    #[error("the pulled page {page} differs from the source")]
    Mismatch {
        /// Index of the page in the source.
        page: usize,
    },
    /// The plain TCP stream failed.
    #[error("plain TCP stream: {0}")]
    Stream(io::Error),
    /// No random bytes for the token.
    #[error(transparent)]
    Token(#[from] TokenError),
}
