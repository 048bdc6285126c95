//! [`QuietRuntime`]: openraft's tokio runtime, with a ticker that sleeps through quiescence.
//!
//! openraft 0.9 runs one ticker task per group that wakes every 150 ms and, when ticking is
//! off (`runtime_config().tick(false)`), only looks at the flag and sleeps again. At 3,000
//! quiescent groups per agent that was 20,000 wake-ups a second doing nothing and most of the
//! idle CPU left after decision 0025. The runtime is openraft's extension point for timers:
//! its `sleep_until` is the ticker's sleep and nothing else's (replication back-off and
//! timeouts use `sleep` and `timeout`). Here that sleep, once due, waits while the group's
//! [`TickGate`] is closed, so a quiescent group's ticker is parked without a timer until the
//! group wakes.
//!
//! Which group a sleep belongs to is carried by a task-local: the replica builds its Raft
//! inside [`TickGate::scope`], and `spawn` hands the gate on to every task openraft starts
//! from there (the ticker among them). A Raft built outside a scope (the meta group) ticks as
//! openraft's own runtime does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use openraft::{AsyncRuntime, OptionalSend, TokioInstant, TokioRuntime};
use tokio::sync::Notify;

tokio::task_local! {
    /// The gate of the group whose Raft is being built or whose task this is.
    static GATE: Arc<TickGate>;
}

/// Whether a group's ticker may run: closed while the group is quiescent.
#[derive(Debug, Default)]
pub struct TickGate {
    closed: AtomicBool,
    opened: Notify,
}

impl TickGate {
    /// Runs `build` (the group's `Raft::new`) so that the tasks it spawns sleep at this gate.
    pub async fn scope<F: Future>(self: &Arc<Self>, build: F) -> F::Output {
        GATE.scope(Arc::clone(self), build).await
    }

    /// Parks the ticker from its next due tick on.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Lets the ticker run again; a parked one ticks at once.
    pub fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
        self.opened.notify_waiters();
    }

    /// Returns once the gate is open.
    async fn passed(&self) {
        loop {
            let opened = self.opened.notified();
            tokio::pin!(opened);
            // Registered before the look at the flag, so an `open` in between is not missed.
            opened.as_mut().enable();
            if !self.closed.load(Ordering::SeqCst) {
                return;
            }
            opened.await;
        }
    }
}

/// The sleep of [`QuietRuntime`].
pub type QuietSleep = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// openraft's [`TokioRuntime`] with a gated ticker sleep. See the module docs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct QuietRuntime;

impl AsyncRuntime for QuietRuntime {
    type JoinError = <TokioRuntime as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::JoinHandle<T>;
    type Sleep = QuietSleep;
    type Instant = TokioInstant;
    type TimeoutError = <TokioRuntime as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> =
        <TokioRuntime as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = <TokioRuntime as AsyncRuntime>::ThreadLocalRng;
    type OneshotSender<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotSender<T>;
    type OneshotReceiverError = <TokioRuntime as AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotReceiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        match GATE.try_with(Arc::clone) {
            Ok(gate) => tokio::spawn(GATE.scope(gate, future)),
            Err(_) => tokio::spawn(future),
        }
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        Box::pin(tokio::time::sleep(duration))
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        let gate = GATE.try_with(Arc::clone).ok();
        Box::pin(async move {
            tokio::time::sleep_until(deadline).await;
            if let Some(gate) = gate {
                gate.passed().await;
            }
        })
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        TokioRuntime::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        TokioRuntime::thread_rng()
    }

    fn oneshot<T: OptionalSend>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>) {
        TokioRuntime::oneshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_due_sleep_waits_while_its_gate_is_closed_and_goes_when_it_opens() {
        let gate = Arc::new(TickGate::default());
        gate.close();
        let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
        gate.scope(async {
            QuietRuntime::spawn(async move {
                QuietRuntime::sleep_until(TokioInstant::now() + Duration::from_millis(20)).await;
                let _ = done_tx.send(());
            });
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            done.try_recv().is_err(),
            "a closed gate let the tick through"
        );
        gate.open();
        tokio::time::timeout(Duration::from_secs(1), done.recv())
            .await
            .expect("an opened gate lets the parked tick go");
    }

    #[tokio::test]
    async fn outside_a_scope_the_sleep_is_a_plain_sleep() {
        let slept = tokio::time::timeout(
            Duration::from_secs(1),
            QuietRuntime::sleep_until(TokioInstant::now() + Duration::from_millis(20)),
        )
        .await;
        assert!(slept.is_ok());
    }
}
