//! Which agent a call goes to, and the retry loop that follows redirects.
//!
//! The router knows the configured endpoints, one cached channel per address it has talked to,
//! and the last known leader of each queue, so after one redirect later calls for that queue
//! go straight to its leader. Calls without a known leader go to the "current" configured
//! endpoint, which moves on to the next one whenever an agent cannot be reached.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};
use crate::retry::{Failure, Resend, RetryPolicy};

/// How long establishing a connection may take before the agent counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Endpoints, connections and leaders, shared by every clone of a [`crate::Client`] and by the
/// publishers and consumers it opens.
#[derive(Debug)]
pub struct Router {
    /// The endpoints the client was built with, in order; never empty.
    endpoints: Vec<String>,
    /// Index into `endpoints` of the agent used when a queue's leader is unknown.
    current: AtomicUsize,
    /// One channel per address; a tonic channel reconnects by itself, so entries stay valid.
    channels: Mutex<HashMap<String, Channel>>,
    /// Last known leader endpoint per queue, learnt from redirects and successful calls.
    leaders: Mutex<HashMap<String, String>>,
    /// Attempts and backoff of every call.
    policy: RetryPolicy,
    /// The channel the client first connected over, for [`crate::Client::raw`].
    first: Channel,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Maps stay consistent across a panic (single inserts and removes), so poison is moot.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Router {
    /// A router over `endpoints` whose first connection is `first`, made to
    /// `endpoints[index]`.
    pub(crate) fn new(
        endpoints: Vec<String>,
        policy: RetryPolicy,
        index: usize,
        first: Channel,
    ) -> Self {
        let mut channels = HashMap::new();
        if let Some(endpoint) = endpoints.get(index) {
            channels.insert(endpoint.clone(), first.clone());
        }
        Self {
            endpoints,
            current: AtomicUsize::new(index),
            channels: Mutex::new(channels),
            leaders: Mutex::new(HashMap::new()),
            policy,
            first,
        }
    }

    /// Connects to the first reachable of `endpoints`, trying each once, so a client built
    /// against agents that are all down fails at once with the last connect error.
    pub(crate) async fn connect(endpoints: Vec<String>, policy: RetryPolicy) -> Result<Self> {
        let mut last = Error::NoEndpoints;
        for (index, endpoint) in endpoints.iter().enumerate() {
            match connect(endpoint).await {
                Ok(channel) => return Ok(Self::new(endpoints.clone(), policy, index, channel)),
                Err(err @ Error::Endpoint { .. }) => return Err(err),
                Err(err) => last = err,
            }
        }
        Err(last)
    }

    /// The channel the client first connected over.
    pub(crate) fn first_channel(&self) -> Channel {
        self.first.clone()
    }

    /// The retry policy.
    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    /// The endpoints the client was built with.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Where a call for `queue` goes first: its known leader, else the current endpoint.
    pub fn target(&self, queue: Option<&str>) -> String {
        if let Some(leader) = queue.and_then(|q| lock(&self.leaders).get(q).cloned()) {
            return leader;
        }
        self.current_endpoint()
    }

    fn current_endpoint(&self) -> String {
        let index = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        self.endpoints[index].clone()
    }

    /// Moves the current endpoint past `failed` (if it is the current one) and returns the new
    /// current endpoint.
    fn rotate_from(&self, failed: &str) -> String {
        let index = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        if self.endpoints[index] == failed {
            // A lost race with another caller rotating too just skips one more endpoint.
            let _ = self.current.compare_exchange(
                index,
                (index + 1) % self.endpoints.len(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        self.current_endpoint()
    }

    /// Records `endpoint` as the leader of `queue`.
    pub fn learn_leader(&self, queue: &str, endpoint: &str) {
        let mut leaders = lock(&self.leaders);
        if leaders.get(queue).map(String::as_str) != Some(endpoint) {
            leaders.insert(queue.to_owned(), endpoint.to_owned());
        }
    }

    /// Forgets the leader of `queue` (it could not be reached or said it is not the leader).
    pub fn forget_leader(&self, queue: &str) {
        lock(&self.leaders).remove(queue);
    }

    /// The cached channel to `endpoint`, connecting first if there is none.
    pub async fn channel(&self, endpoint: &str) -> Result<Channel> {
        if let Some(channel) = lock(&self.channels).get(endpoint) {
            return Ok(channel.clone());
        }
        let channel = connect(endpoint).await?;
        // Two callers connecting at once both succeed; the first stored channel wins.
        Ok(lock(&self.channels)
            .entry(endpoint.to_owned())
            .or_insert(channel)
            .clone())
    }

    /// Runs `op` against the agent that should serve `queue`, following redirects and retrying
    /// refusals with backoff (see [`Failure`] for what is retried), at most
    /// [`RetryPolicy::max_attempts`] times; then the last error.
    pub async fn call<T, F, Fut>(&self, queue: Option<&str>, resend: Resend, mut op: F) -> Result<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut route = Route::new(self, queue);
        loop {
            let failure = match self.channel(&route.target).await {
                Ok(channel) => match op(channel).await {
                    Ok(value) => {
                        route.succeeded();
                        return Ok(value);
                    }
                    Err(status) => Failure::classify(status),
                },
                Err(err @ Error::Connect { .. }) => Failure::Unreachable(err),
                Err(err) => Failure::Final(err),
            };
            route.next(failure, resend).await?;
        }
    }
}

/// The state of one call's walk through the cluster: where it goes next and how many
/// attempts it has used. Shared by unary calls and by stream (re)opening.
#[derive(Debug)]
pub struct Route<'r> {
    router: &'r Router,
    queue: Option<String>,
    /// Where the next attempt goes.
    pub target: String,
    attempts: u32,
    retries_waited: u32,
    /// Addresses this call was redirected to; a redirect to one of them again is waited for
    /// (leadership is moving), a redirect to a new one is followed at once.
    visited: Vec<String>,
}

impl<'r> Route<'r> {
    /// Starts a call for `queue` at its known leader or the current endpoint.
    pub fn new(router: &'r Router, queue: Option<&str>) -> Self {
        let target = router.target(queue);
        Self {
            router,
            queue: queue.map(str::to_owned),
            visited: vec![target.clone()],
            target,
            attempts: 0,
            retries_waited: 0,
        }
    }

    /// The queue this call is for (empty for calls about no queue).
    pub fn queue(&self) -> &str {
        self.queue.as_deref().unwrap_or_default()
    }

    /// Records that the attempt at `target` succeeded: it serves the queue.
    pub fn succeeded(&self) {
        if let Some(queue) = &self.queue {
            self.router.learn_leader(queue, &self.target);
        }
    }

    /// Decides on the next attempt after `failure`: returns once it may be made (after any
    /// backoff), or the error to give up with.
    pub async fn next(&mut self, failure: Failure, resend: Resend) -> Result<()> {
        self.attempts += 1;
        if self.attempts >= self.router.policy.max_attempts || !failure.is_retryable(resend) {
            return Err(failure.into_error());
        }
        let wait = match &failure {
            Failure::Redirect(leader, _) => {
                if let Some(queue) = &self.queue {
                    self.router.learn_leader(queue, leader);
                }
                let fresh = !self.visited.contains(leader);
                self.target = leader.clone();
                self.visited.push(leader.clone());
                !fresh
            }
            // The agent is alive but knows no leader yet: ask it again after the backoff.
            Failure::NoLeader(_) => {
                self.forget();
                true
            }
            // The agent is gone (or the connection to it): try the next configured one.
            Failure::Unreachable(_) | Failure::Broken(_) => {
                self.forget();
                self.target = self.router.rotate_from(&self.target);
                true
            }
            // Not reached: final failures were returned above.
            Failure::Final(_) => false,
        };
        if wait {
            self.retries_waited += 1;
            tokio::time::sleep(self.router.policy.backoff(self.retries_waited)).await;
        }
        Ok(())
    }

    fn forget(&self) {
        if let Some(queue) = &self.queue {
            self.router.forget_leader(queue);
        }
    }
}

/// Opens a channel to `endpoint`, waiting until the connection is made.
async fn connect(endpoint: &str) -> Result<Channel> {
    Endpoint::from_shared(endpoint.to_owned())
        .map_err(|source| Error::Endpoint {
            endpoint: endpoint.to_owned(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .map_err(|source| Error::Connect {
            endpoint: endpoint.to_owned(),
            source,
        })
}
