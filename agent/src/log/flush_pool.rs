//! [`FlushPool`]: the threads that write and fsync every log of the process.
//!
//! A thread per log cost nothing with a few partitions and ~3,000 threads with thousands (their
//! stacks, malloc arenas and encoding buffers in RSS, and a wake-up each to shut down). Logs
//! with something to write are queued here instead, and a pool of threads serves them: one
//! thread per busy log up to [`MAX_THREADS`], so a few busy partitions still fsync in parallel
//! as before, while idle ones hold no thread at all. A log is queued at most once at a time,
//! and the thread that takes it writes everything pending, group-committing as before.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, Weak};
use std::time::Instant;

use crate::config::FsyncPolicy;

use super::file_log::Shared;
use super::flusher;

/// Most flusher threads: busy logs beyond this many wait their turn, and each turn then
/// commits a larger group. More than the fsyncs a disk overlaps usefully.
pub const MAX_THREADS: usize = 32;

/// The pool of flusher threads. See the module docs.
#[derive(Debug, Default)]
pub struct FlushPool {
    state: Mutex<PoolState>,
    /// Wakes an idle thread: a log was queued or a deferred sync came due earlier.
    wake: Condvar,
}

#[derive(Debug, Default)]
struct PoolState {
    /// Logs with work, in the order they asked.
    ready: VecDeque<Arc<Shared>>,
    /// Deferred fsyncs of the `Interval` policy, earliest first.
    timers: BinaryHeap<Reverse<Due>>,
    /// Threads started.
    threads: usize,
    /// Threads waiting for work.
    idle: usize,
}

/// A deferred fsync: the log (weakly, a dropped log syncs itself) and when it is due.
#[derive(Debug)]
struct Due {
    at: Instant,
    log: Weak<Shared>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

/// Flusher threads started in this process, for `/metrics`.
pub static THREADS: LazyLock<prometheus_client::metrics::gauge::Gauge> =
    LazyLock::new(Default::default);

/// The process's pool. Logs are opened deep below the agent's setup (replicas, the meta group,
/// tests), and a pool per process is what bounds the threads, so it is process-wide.
static SHARED: LazyLock<FlushPool> = LazyLock::new(FlushPool::default);

impl FlushPool {
    /// The pool every log of this process uses.
    pub fn shared() -> &'static FlushPool {
        &SHARED
    }

    /// Queues `log` unless it is queued or being served already; the thread serving it looks
    /// at its pending entries again before letting it go (see [`serve`]).
    pub fn schedule(&'static self, log: &Arc<Shared>) {
        if log.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut state = self.lock();
        state.ready.push_back(Arc::clone(log));
        if state.idle == 0 && state.threads < MAX_THREADS {
            state.threads += 1;
            let spawned = std::thread::Builder::new()
                .name("sluice-log-flush".into())
                .spawn(move || self.work());
            if let Err(e) = spawned {
                state.threads -= 1;
                tracing::error!(error = %e, threads = state.threads, "cannot start a log flusher thread");
                if state.threads == 0 {
                    // No thread would ever take it (and, being queued, it would not be queued
                    // again): the appender writes and syncs its own group, slowly but surely.
                    state.ready.retain(|queued| !Arc::ptr_eq(queued, log));
                    THREADS.set(0);
                    drop(state);
                    serve(self, log, &mut Vec::new());
                    return;
                }
            }
            THREADS.set(i64::try_from(state.threads).unwrap_or(i64::MAX));
        } else {
            self.wake.notify_one();
        }
    }

    /// Asks for `log` to be served again at `at` (a deferred fsync).
    fn sync_at(&self, log: &Arc<Shared>, at: Instant) {
        let mut state = self.lock();
        let earlier = state.timers.peek().is_none_or(|Reverse(d)| at < d.at);
        state.timers.push(Reverse(Due {
            at,
            log: Arc::downgrade(log),
        }));
        if earlier {
            self.wake.notify_one();
        }
    }

    /// Body of a flusher thread: serves queued logs for the life of the process.
    fn work(&'static self) {
        let mut buf = Vec::new();
        loop {
            let log = self.next();
            serve(self, &log, &mut buf);
            // A burst grows the buffer to a group's size; keep a small one between groups.
            if buf.capacity() > KEEP_BUFFER_BYTES {
                buf = Vec::new();
            }
        }
    }

    /// The next log to serve, waiting for one (or for a deferred fsync to come due).
    fn next(&self) -> Arc<Shared> {
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            while let Some(Reverse(due)) = state.timers.peek()
                && due.at <= now
            {
                let Some(Reverse(due)) = state.timers.pop() else {
                    break;
                };
                if let Some(log) = due.log.upgrade()
                    && !log.scheduled.swap(true, Ordering::AcqRel)
                {
                    state.ready.push_back(log);
                }
            }
            if let Some(log) = state.ready.pop_front() {
                return log;
            }
            let timeout = state.timers.peek().map(|Reverse(d)| d.at - now);
            state.idle += 1;
            state = match timeout {
                Some(timeout) => match self.wake.wait_timeout(state, timeout) {
                    Ok((state, _)) => state,
                    Err(poisoned) => poisoned.into_inner().0,
                },
                None => self
                    .wake
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            };
            state.idle -= 1;
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Every change to the state is a single push, pop or counter step: valid after a panic.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Largest encoding buffer a thread keeps between groups.
const KEEP_BUFFER_BYTES: usize = 1 << 20;

/// What a flusher does with a log next.
enum Step {
    Flush,
    Sync,
}

/// Writes everything `log` has pending (and its due fsync), then lets it go. The log stops
/// being `scheduled` under its state lock, in the same look that found nothing to write: an
/// append is pushed under that lock and schedules after it, so it is either seen here or
/// queues the log again.
fn serve(pool: &FlushPool, log: &Arc<Shared>, buf: &mut Vec<u8>) {
    loop {
        let step = {
            let state = log.lock_state();
            let due = match (log.config.fsync, state.unsynced_since) {
                (FsyncPolicy::Interval(every), Some(since)) => Some(since + every),
                _ => None,
            };
            if state.failure.is_some() {
                // Nothing more can be written: the log refuses appends from now on.
                log.scheduled.store(false, Ordering::Release);
                return;
            }
            if !state.pending.is_empty() {
                Step::Flush
            } else if let Some(due) = due {
                if Instant::now() >= due {
                    Step::Sync
                } else {
                    log.scheduled.store(false, Ordering::Release);
                    drop(state);
                    pool.sync_at(log, due);
                    return;
                }
            } else {
                log.scheduled.store(false, Ordering::Release);
                return;
            }
        };
        let mut writer = log.lock_writer();
        let result = match step {
            Step::Flush => flusher::flush(log, &mut writer, buf, false).map(drop),
            Step::Sync => flusher::sync_active(log, &writer),
        };
        if let Err(err) = result {
            tracing::error!(dir = %log.files.dir().display(), error = %err, "log writer failed; the log refuses further appends");
        }
    }
}
