//! The shared shutdown signal.
//!
//! The process-level trigger ([`signal`]) is separate from the in-process fan-out
//! ([`Shutdown`]): `server::run` takes any future as its trigger so tests can drive it, and hands
//! every long-lived stream a [`Shutdown`] so it can end itself cleanly while the server drains.

use tokio::sync::watch;

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C).
///
/// Falls back to Ctrl-C only when the SIGTERM handler cannot be installed, which only happens
/// on exotic platforms; the agent is still stoppable then.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
            }
        }
        Err(err) => {
            tracing::warn!(%err, "cannot install SIGTERM handler; only Ctrl-C stops the agent");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Fires [`Shutdown`] observers; dropping it also fires them.
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
}

/// A cheap, cloneable observer of the shutdown signal.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// A connected trigger and observer.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger { tx }, Shutdown { rx })
}

impl Trigger {
    /// Tells every observer to wind down.
    pub fn fire(&self) {
        self.tx.send_replace(true);
    }
}

impl Shutdown {
    /// Whether shutdown has begun.
    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown has begun (at once if it already has). Cancel-safe.
    pub async fn recv(&mut self) {
        // An error means the trigger was dropped, which also means "shut down".
        let _ = self.rx.wait_for(|fired| *fired).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn observers_see_the_trigger_fire_and_its_drop() {
        let (trigger, mut a) = channel();
        let mut b = a.clone();
        assert!(!a.is_shutdown());
        trigger.fire();
        a.recv().await;
        assert!(b.is_shutdown());

        let (trigger, mut c) = channel();
        drop(trigger);
        c.recv().await;
        b.recv().await;
    }
}
