//! The RDMA verbs transport (cargo feature `verbs`): libibverbs through
//! `rdma-sys` 0.3.0. Every `unsafe` of this crate lives in this module.
//!
//! The target registers each served region with remote-read access only
//! (no local or remote write) and, per initiator, creates a reliable-
//! connection queue pair whose only access flag is remote read. The
//! initiator's queue pair grants no remote access at all; its buffers are
//! registered for local write (the device writes READ results there). The
//! queue pairs learn about each other over the TCP control connection,
//! authenticated and encrypted like the TCP transport's (a Noise handshake
//! keyed by the token, `channel.rs`; then ACCEPT carries the target's
//! endpoint, ENDPOINT the initiator's, READY says the target's QP is ready,
//! all sealed), which then stays open: closing it tears the target's queue
//! pair down.
//!
//! **Trusted fabrics only.** The RDMA READs themselves travel in the clear:
//! no NIC here encrypts one-sided reads, and their only credential is the
//! rkey, which anyone on the fabric who sees the traffic learns. Whoever
//! can sniff or inject on the RDMA fabric can read the served memory (never
//! write it: the regions grant remote read only). Use verbs only on a
//! fabric no untrusted host can reach, and TCP everywhere else
//! (docs/security.md).
//!
//! Calls used, all through `rdma_sys`:
//!
//! ```text
//! ibv_get_device_list / ibv_free_device_list / ibv_get_device_name
//!     (NULL with errno ENOSYS where the kernel has no RDMA support)
//! ibv_open_device / ibv_close_device / ibv_query_device
//! ___ibv_query_port      rdma-sys's port of the static-inline wrapper; its
//!                        bindgen `ibv_query_port` takes the old compat struct
//! ibv_query_gid / ibv_alloc_pd / ibv_dealloc_pd
//! ibv_reg_mr / ibv_dereg_mr
//! ibv_create_cq / ibv_destroy_cq / ibv_create_qp / ibv_modify_qp / ibv_destroy_qp
//! ibv_post_send / ibv_poll_cq   static inline in C, written in Rust by rdma-sys
//! ```
//!
//! Files: `device.rs` (device, port, protection domain), `mr.rs` (memory
//! registrations and local buffers), `qp.rs` (queue pairs and their state
//! transitions, with the attribute building kept pure), `post.rs` (work
//! requests and completion statuses, pure), `target.rs`, `initiator.rs`.

mod device;
mod initiator;
mod mr;
mod post;
mod qp;
mod target;

pub use device::probe;
pub use initiator::VerbsInitiator;
pub use target::VerbsTarget;
