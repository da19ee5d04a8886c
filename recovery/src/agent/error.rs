//! Why the agent, or a database's registration with it, failed.

use crate::transport;

/// Why the agent or a registration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A socket or descriptor operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the agent was doing.
        what: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The transport could not start.
    #[error(transparent)]
    Serve(#[from] transport::ServeError),
    /// Registering a region with the transport failed.
    #[error(transparent)]
    Register(#[from] transport::RegisterError),
    /// The peer sent something the protocol does not allow.
    #[error("agent protocol: {0}")]
    Protocol(String),
    /// The agent's Unix socket cannot be made private at the path given.
    #[error("agent socket: {0}")]
    Socket(String),
    /// The peer on the Unix socket is not allowed to talk to this agent.
    #[error("not allowed: {0}")]
    NotAllowed(String),
    /// A descriptor handed over is not a memfd the agent can hold safely.
    #[error("bad memfd: {0}")]
    BadMemfd(String),
    /// The agent refused the request (its answer, on the database's side).
    #[error("the agent refused: {0}")]
    Refused(String),
    /// A re-attach found nothing to take back: the agent holds no newer
    /// copy of the heap than its baseline (it never had it, or the heap was
    /// closed cleanly or recovered elsewhere), so the baseline is current.
    #[error("{NOTHING_HELD}{0}")]
    NothingHeld(String),
    /// The heap has no baseline or control region (memfd-only heaps cannot be served).
    #[error("the heap has no baseline: only heaps created with a baseline file can be handed to an agent")]
    NoBaseline,
    /// A lazily recovered heap cannot be registered before every page is
    /// in and committed: the agent would serve the pages still missing as
    /// zeros.
    #[error(
        "the heap is still loading lazily ({resident} of {pages} pages in): register it once Heap::wait_lazy \
         (remem_lazy_wait) returns"
    )]
    StillLoading {
        /// Pages in memory so far.
        resident: u64,
        /// Pages in the heap.
        pages: u64,
    },
    /// Re-attaching the heap failed.
    #[error(transparent)]
    Heap(#[from] remem_alloc::Error),
}

/// How [`AgentError::NothingHeld`] reads on the wire (after `error: `).
pub(crate) const NOTHING_HELD: &str = "nothing held: ";

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}
