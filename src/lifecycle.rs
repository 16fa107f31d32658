//! How the process is stopping, shared by every part that acts on it: the
//! graceful stop sets it, the listeners, the gateway and the admin listener
//! read it.

use tokio_util::sync::CancellationToken;

/// How the process is stopping, for every part that acts on it.
#[derive(Clone, Default)]
pub(crate) struct Lifecycle {
    /// A graceful stop began: `/readyz` fails, idle connections close, and
    /// every answer says `Connection: close`.
    pub(crate) draining: CancellationToken,
    /// The drain timeout passed: requests still in flight are cut off
    /// (streams end with an error event) so they are settled and recorded.
    pub(crate) cut: CancellationToken,
}
