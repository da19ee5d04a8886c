//! The TCP transport: runs anywhere, with the semantics of an RDMA reliable
//! connection (see the [parent module](crate::transport)). The target's
//! threads answer the reads; the wire format is in `wire.rs`.

pub(crate) mod initiator;
pub(crate) mod target;

pub use initiator::TcpInitiator;
pub use target::TcpTarget;
