//! The shared shutdown signal.
//!
//! The process-level trigger ([`signal`]) is separate from the in-process fan-out
//! ([`Shutdown`]): `server::run` takes any future as its trigger so tests can drive it, and hands
//! every long-lived stream a [`Shutdown`] so it can end itself cleanly while the server drains.

use tokio::sync::watch;

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C).
///
/// The handlers are installed when this is called, not when the future is first polled, so a
/// signal that arrives right after the agent announced itself is not the default (fatal) one.
/// Falls back to a future that never resolves on a signal it cannot catch, which only happens
/// on exotic platforms; the process then keeps the default action for that signal.
pub fn signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    if let Err(err) = &term {
        tracing::warn!(%err, "cannot install the SIGTERM handler");
    }
    if let Err(err) = &int {
        tracing::warn!(%err, "cannot install the SIGINT handler");
    }
    async move {
        let term = async {
            match term {
                Ok(mut s) => s.recv().await,
                Err(_) => std::future::pending().await,
            }
        };
        let int = async {
            match int {
                Ok(mut s) => s.recv().await,
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term => tracing::info!("SIGTERM received, shutting down"),
            _ = int => tracing::info!("SIGINT received, shutting down"),
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
