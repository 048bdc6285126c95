//! [`Partition`]: one partition's log, its delivery state behind a lock, and the I/O around it.
//!
//! The lock is held only to validate, encode, append and apply a whole batch; waiting for
//! durability and reading message bodies happen outside it. Every state change goes through
//! [`Partition::execute`]: append the commands, then apply the same commands, under one lock
//! hold, so the in-memory state always equals "the log replayed".

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use sluice_proto::storage::v1::{
    DeliverCommand, LogCommand, MessageRef, PublishCommand, SettleCommand, SettleKind,
    log_command::Command,
};
use sluice_proto::v1::{Delivery, DeliveryTag, Message, MessageId, SettleAction};

use super::clock::Clock;
use super::consumer::ConsumerSlot;
use super::entry::{self, entry_of, slot_of};
use super::replica_link::ReplicaLink;
use super::state::{Counters, Disposal, DisposalItem, PartitionState, StateConfig};
use crate::error::{BrokerError, Confirmation, SettleFailure, Stored};
use crate::log::{LogError, LogStore};

/// What stats name as the leader of a partition on a single agent.
const LOCAL_LEADER: &str = "local";
/// Raft term of every entry on a single agent.
const TERM: u64 = 1;
/// Entries read per cursor read-ahead or replay batch.
const READ_BATCH_ENTRIES: usize = 512;
/// Bytes read per cursor read-ahead or replay batch.
const READ_BATCH_BYTES: usize = 1024 * 1024;

/// Limits and routing data a publish batch needs from its queue.
#[derive(Debug, Clone, Default)]
pub struct PublishContext {
    /// Queue default TTL (0 = none).
    pub message_ttl_ms: u64,
    /// Backlog limit in messages (0 = none).
    pub max_backlog_messages: u64,
    /// Backlog limit in bytes (0 = none).
    pub max_backlog_bytes: u64,
    /// Backlog of the queue's other partitions (messages, bytes), counted against the limits.
    pub others_backlog: (u64, u64),
    /// For dead-letter copies: source queue name.
    pub dead_letter_source: String,
    /// For dead-letter copies: reason.
    pub dead_letter_reason: String,
}

/// What a confirm waits for: the last log entry it depends on and, on a replicated partition,
/// the leadership epoch the commands were proposed in (a later epoch may have replaced them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaitPoint {
    /// Log entry index (0 = nothing to wait for).
    pub index: u64,
    /// Leadership epoch of the proposal (0 on a single agent).
    pub epoch: u64,
}

impl WaitPoint {
    /// The later of two points of the same call; `offset` names a command.
    fn max(self, offset: u64, epoch: u64) -> Self {
        Self {
            index: self.index.max(entry_of(offset)),
            epoch,
        }
    }
}

pub use super::state::{SharedState, lock_state};

/// What a publish under the lock produced.
#[derive(Debug, Default)]
pub struct Published {
    /// (position in the request, confirm).
    pub confirms: Vec<(usize, Confirmation)>,
    /// Wait for this before confirming.
    pub wait: WaitPoint,
    /// Whether new messages were enqueued.
    pub enqueued: bool,
}

/// What a settle under the lock produced.
#[derive(Debug, Default)]
pub struct Settled {
    /// Tags that failed.
    pub failures: Vec<SettleFailure>,
    /// Wait for this before reporting success.
    pub wait: WaitPoint,
    /// Messages to dead-letter now (rejects, nacks past `max_deliveries`).
    pub disposals: Vec<DisposalItem>,
}

/// What a timer pass produced.
#[derive(Debug, Default)]
pub struct Ticked {
    /// Something became deliverable.
    pub became_ready: bool,
    /// Messages to dead-letter.
    pub disposals: Vec<DisposalItem>,
    /// Earliest time the next pass is needed.
    pub next_timer_ms: Option<u64>,
}

/// One partition of a queue.
pub struct Partition {
    /// Queue name (for deliveries and errors).
    queue: String,
    /// Partition number.
    id: u32,
    log: Arc<dyn LogStore>,
    state: SharedState,
    config: StateConfig,
    clock: Arc<dyn Clock>,
    /// Set when this partition is one replica of a Raft group.
    replica: Option<Arc<ReplicaLink>>,
    /// The state holds commands applied as leader that may not be committed (a replica that
    /// stops leading must rebuild it from the committed log).
    speculative: AtomicBool,
    /// (offset, publish time) of the oldest unsettled message last looked up, so stats do
    /// not read the log every time.
    oldest: Mutex<Option<(u64, u64)>>,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("queue", &self.queue)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Why a partition could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The log failed (I/O, or corruption naming the file and offset).
    #[error(transparent)]
    Log(#[from] LogError),
    /// An entry passed its checksum but is not a valid command.
    #[error(transparent)]
    BadCommand(#[from] super::state::BadCommand),
}

impl Partition {
    /// Opens a partition on `log`, rebuilding its state by replaying every retained entry.
    pub fn open(
        queue: &str,
        id: u32,
        log: Arc<dyn LogStore>,
        config: StateConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, OpenError> {
        let mut state = replay(log.as_ref(), config, u64::MAX)?;
        state.finish_replay(false, clock.now_ms());
        Ok(Self::build(
            queue,
            id,
            log,
            Arc::new(Mutex::new(state)),
            config,
            clock,
            None,
        ))
    }

    /// A replica of a replicated partition: `state` is shared with `link`'s state machine,
    /// which applies committed entries to it.
    pub fn replicated(
        queue: &str,
        id: u32,
        log: Arc<dyn LogStore>,
        state: SharedState,
        config: StateConfig,
        clock: Arc<dyn Clock>,
        link: Arc<ReplicaLink>,
    ) -> Self {
        Self::build(queue, id, log, state, config, clock, Some(link))
    }

    fn build(
        queue: &str,
        id: u32,
        log: Arc<dyn LogStore>,
        state: SharedState,
        config: StateConfig,
        clock: Arc<dyn Clock>,
        replica: Option<Arc<ReplicaLink>>,
    ) -> Self {
        Self {
            queue: queue.to_owned(),
            id,
            log,
            state,
            config,
            clock,
            replica,
            speculative: AtomicBool::new(false),
            oldest: Mutex::new(None),
        }
    }

    /// The Raft side, when replicated.
    pub fn replica(&self) -> Option<&Arc<ReplicaLink>> {
        self.replica.as_ref()
    }

    /// Whether this agent may serve the partition now: always on a single agent; when
    /// replicated, only as the ready leader.
    pub fn is_serving(&self) -> bool {
        self.replica.as_ref().is_none_or(|r| r.status().ready)
    }

    /// Who leads this partition, for stats: `local` on a single agent; the leader's client
    /// address when replicated (empty during an election).
    pub fn leader_label(&self) -> String {
        match &self.replica {
            None => LOCAL_LEADER.to_owned(),
            Some(link) => link
                .status()
                .leader
                .and_then(|l| (link.addresses)(l))
                .unwrap_or_default(),
        }
    }

    /// Whether the state may hold uncommitted commands applied as leader.
    pub fn is_speculative(&self) -> bool {
        self.speculative.load(Ordering::Acquire)
    }

    /// The error for a request this replica cannot serve, naming the leader when known.
    pub fn not_leader(&self) -> BrokerError {
        BrokerError::NotLeader {
            what: format!("partition {} of queue {:?}", self.id, self.queue),
            leader: self.replica.as_ref().and_then(|r| r.leader_address()),
        }
    }

    fn check_serving(&self) -> Result<(), BrokerError> {
        if self.is_serving() {
            Ok(())
        } else {
            Err(self.not_leader())
        }
    }

    /// Becomes the serving leader: in-flight deliveries of the previous leader's consumers stay
    /// in flight until their own deadlines, settled by their tags (decision 0018), and a state that held another term's speculative commands is first
    /// rebuilt from the committed log up to `applied` (everything in the log is committed
    /// when a leader starts serving).
    pub fn start_leading(&self, applied: u64) -> Result<(), OpenError> {
        let mut st = self.state();
        if self.speculative.swap(false, Ordering::AcqRel) || st.next_entry() != applied + 1 {
            *st = replay(self.log.as_ref(), self.config, applied)?;
        }
        st.finish_replay(true, self.clock.now_ms());
        Ok(())
    }

    /// Stops leading: the state is rebuilt from the committed log up to `applied`, dropping
    /// speculative commands the next leader may truncate. The caller holds the state
    /// machine's lock, so no committed entry is applied meanwhile.
    pub fn stop_leading(&self, applied: u64) -> Result<(), OpenError> {
        if self.speculative.swap(false, Ordering::AcqRel) {
            *self.state() = replay(self.log.as_ref(), self.config, applied)?;
        }
        Ok(())
    }

    /// Partition number.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The partition's log.
    pub fn log(&self) -> &Arc<dyn LogStore> {
        &self.log
    }

    fn state(&self) -> MutexGuard<'_, PartitionState> {
        lock_state(&self.state)
    }

    /// Appends `commands` (on a single agent, one entry each) or stages them for the proposer
    /// (as the leader of a replicated partition, packed into entries), and applies them to
    /// `state`; returns what a confirm must wait for and each command's offset.
    fn execute(
        &self,
        state: &mut PartitionState,
        commands: &[LogCommand],
    ) -> Result<(WaitPoint, Vec<u64>), BrokerError> {
        if commands.is_empty() {
            return Ok((WaitPoint::default(), Vec::new()));
        }
        // One allocation for the whole batch; each entry is a cheap slice of it.
        let total: usize = commands.iter().map(|c| c.encoded_len()).sum();
        let mut buf = BytesMut::with_capacity(total);
        let mut data: Vec<Bytes> = Vec::with_capacity(commands.len());
        for command in commands {
            command.encode_raw(&mut buf);
            data.push(buf.split().freeze());
        }
        let (offsets, epoch) = match &self.replica {
            None => {
                let first = self.log.append(TERM, &data)?;
                let offsets: Vec<u64> = (first..)
                    .zip(commands)
                    .map(|(index, command)| {
                        state.apply_commands(index, std::slice::from_ref(command));
                        entry::offset(index, 0)
                    })
                    .collect();
                (offsets, 0)
            }
            Some(link) => {
                let status = link.status();
                if !status.ready {
                    return Err(self.not_leader());
                }
                // The proposer takes whole entries in order and checks that each lands at
                // exactly the index it was staged at; the state only moves forward under this
                // lock.
                self.speculative.store(true, Ordering::Release);
                let offsets: Vec<u64> = data
                    .into_iter()
                    .zip(commands)
                    .map(|(data, command)| state.stage(status.epoch, command, data))
                    .collect();
                link.wake_proposer();
                (offsets, status.epoch)
            }
        };
        let last = offsets.last().copied().unwrap_or_default();
        Ok((
            WaitPoint {
                index: entry_of(last),
                epoch,
            },
            offsets,
        ))
    }

    fn epoch(&self) -> u64 {
        self.replica.as_ref().map_or(0, |r| r.status().epoch)
    }

    /// Enqueues a batch (already validated) under one lock hold. Duplicates (idempotency key
    /// seen in the window, or earlier in the batch) are confirmed with the first id; messages
    /// over the backlog limit get RESOURCE_EXHAUSTED. Confirm only after
    /// [`Partition::wait_durable`] on `wait_index`.
    pub fn publish(
        &self,
        items: Vec<(usize, Message)>,
        ctx: &PublishContext,
    ) -> Result<Published, BrokerError> {
        self.check_serving()?;
        let now = self.clock.now_ms();
        let epoch = self.epoch();
        let mut st = self.state();
        let (own_messages, own_bytes) = st.backlog();
        let mut messages = own_messages + ctx.others_backlog.0;
        let mut bytes = own_bytes + ctx.others_backlog.1;
        let mut out = Published::default();
        let mut commands = Vec::with_capacity(items.len());
        // Positions (in the request) of new messages, parallel to `commands`.
        let mut positions = Vec::with_capacity(items.len());
        // Keys first seen in this batch → index into `commands`; and duplicates of them.
        let mut batch_keys: HashMap<String, usize> = HashMap::new();
        let mut batch_duplicates: Vec<(usize, usize)> = Vec::new();
        for (position, message) in items {
            let key = &message.idempotency_key;
            if !key.is_empty() {
                if let Some(offset) = st.dedup(key, now) {
                    out.wait = out.wait.max(offset, epoch);
                    out.confirms.push((position, self.confirm(offset, true)));
                    continue;
                }
                if let Some(&first) = batch_keys.get(key) {
                    batch_duplicates.push((position, first));
                    continue;
                }
            }
            let size = message.payload.len() as u64;
            if (ctx.max_backlog_messages > 0 && messages + 1 > ctx.max_backlog_messages)
                || (ctx.max_backlog_bytes > 0 && bytes + size > ctx.max_backlog_bytes)
            {
                out.confirms.push((
                    position,
                    Err(BrokerError::BacklogFull {
                        queue: self.queue.clone(),
                        messages,
                        bytes,
                    }),
                ));
                continue;
            }
            messages += 1;
            bytes += size;
            if !key.is_empty() {
                batch_keys.insert(key.clone(), commands.len());
            }
            commands.push(LogCommand {
                command: Some(Command::Publish(publish_command(message, now, ctx))),
            });
            positions.push(position);
        }
        let (wait, offsets) = self.execute(&mut st, &commands)?;
        drop(st);
        if !commands.is_empty() {
            out.wait = WaitPoint {
                index: out.wait.index.max(wait.index),
                epoch: wait.epoch,
            };
            out.enqueued = true;
            for (&offset, position) in offsets.iter().zip(positions) {
                out.confirms.push((position, self.confirm(offset, false)));
            }
            for (position, first_of_key) in batch_duplicates {
                out.confirms
                    .push((position, self.confirm(offsets[first_of_key], true)));
            }
        }
        Ok(out)
    }

    fn confirm(&self, offset: u64, duplicate: bool) -> Confirmation {
        Ok(Stored {
            id: MessageId {
                partition: self.id,
                offset,
            },
            duplicate,
        })
    }

    /// Waits until every entry up to `wait.index` is durable (immediately for 0): fsynced on a
    /// single agent, committed by a quorum (and applied) when replicated.
    pub async fn wait_durable(&self, wait: WaitPoint) -> Result<(), BrokerError> {
        let index = wait.index;
        if index == 0 {
            return Ok(());
        }
        if let Some(link) = &self.replica {
            let waiting = std::time::Instant::now();
            let mut rx = link.status.subscribe();
            let status = *rx
                .wait_for(|s| s.epoch != wait.epoch || !s.ready || s.confirmed >= index)
                .await
                .map_err(|_| self.not_leader())?;
            crate::replication::timing::record("confirm_wait", waiting.elapsed());
            return if status.epoch == wait.epoch && status.confirmed >= index {
                Ok(())
            } else {
                // Leadership moved before the commit was seen: the outcome is unknown.
                Err(BrokerError::LeaderChanged {
                    queue: self.queue.clone(),
                    partition: self.id,
                    index,
                })
            };
        }
        let mut rx = self.log.durability();
        let durability = rx
            .wait_for(|d| d.durable_next > index || d.failure.is_some())
            .await
            .map_err(|_| BrokerError::PartitionClosed {
                queue: self.queue.clone(),
                partition: self.id,
            })?;
        if durability.durable_next > index {
            return Ok(());
        }
        match &durability.failure {
            Some(failure) => Err(BrokerError::Storage(LogError::Failed(failure.clone()))),
            None => Ok(()),
        }
    }

    /// Runs the read cursors until every level with unseen messages has read-ahead (reads
    /// outside the lock).
    fn fill(&self) -> Result<(), BrokerError> {
        loop {
            let request = self.state().fill_request(self.log.first_index());
            let Some((level, from)) = request else {
                return Ok(());
            };
            let mut entries = self
                .log
                .read_range(from, READ_BATCH_ENTRIES, READ_BATCH_BYTES)?;
            if let Some(link) = &self.replica {
                // Consumers see only committed messages: an uncommitted one may vanish in a
                // failover.
                let applied = link.status().applied;
                entries.retain(|e| e.index <= applied);
            }
            if entries.is_empty() {
                return Ok(());
            }
            let now = self.clock.now_ms();
            self.state()
                .fill(level, &entries, now)
                .map_err(|e| self.corrupted(e.to_string()))?;
        }
    }

    fn corrupted(&self, reason: String) -> BrokerError {
        BrokerError::PartitionCorrupted {
            queue: self.queue.clone(),
            partition: self.id,
            reason,
        }
    }

    /// Delivers up to `max` messages to `consumer`: records the deliveries in the log (not
    /// waiting for durability: losing them in a crash only undercounts attempts), then reads
    /// the bodies of redeliveries outside the lock.
    pub fn take(
        &self,
        max: usize,
        consumer: &Arc<ConsumerSlot>,
    ) -> Result<Vec<Delivery>, BrokerError> {
        if max == 0 || !self.is_serving() {
            return Ok(Vec::new());
        }
        self.fill()?;
        let now = self.clock.now_ms();
        let picks = {
            let mut st = self.state();
            let picks = st.take(max, now);
            if !picks.is_empty() {
                let deliver = DeliverCommand {
                    time_ms: now,
                    messages: picks.iter().map(|p| p.message).collect(),
                };
                self.execute(
                    &mut st,
                    &[LogCommand {
                        command: Some(Command::Deliver(deliver)),
                    }],
                )?;
                st.hand_over(&picks, consumer, now);
            }
            self.discard_disposals(&mut st, now)?;
            picks
        };
        let mut deliveries = Vec::with_capacity(picks.len());
        for pick in picks {
            let publish = match pick.publish {
                Some(p) => p,
                None => self.read_publish(pick.message.offset)?,
            };
            deliveries.push(self.delivery(pick.message, publish));
        }
        Ok(deliveries)
    }

    fn delivery(&self, message: MessageRef, publish: PublishCommand) -> Delivery {
        Delivery {
            id: Some(MessageId {
                partition: self.id,
                offset: message.offset,
            }),
            tag: Some(DeliveryTag {
                partition: self.id,
                offset: message.offset,
                attempt: message.attempt,
            }),
            message: publish.message,
            publish_time_ms: publish.publish_time_ms,
            attempt: message.attempt,
            queue: self.queue.clone(),
            dead_letter_source: publish.dead_letter_source,
            dead_letter_reason: publish.dead_letter_reason,
        }
    }

    /// Reads a stored message.
    pub fn read_publish(&self, offset: u64) -> Result<PublishCommand, BrokerError> {
        let missing = || {
            self.corrupted(format!(
                "message at offset {offset} is missing from the log"
            ))
        };
        let entry = self.log.read(entry_of(offset))?.ok_or_else(missing)?;
        match entry::decode_at(entry.index, entry.data.as_ref(), slot_of(offset)) {
            Ok(Some(LogCommand {
                command: Some(Command::Publish(p)),
            })) => Ok(p),
            Ok(Some(_)) => Err(self.corrupted(format!("offset {offset} is not a message"))),
            Ok(None) => Err(missing()),
            Err(e) => Err(self.corrupted(e.to_string())),
        }
    }

    /// Without a dead-letter queue, disposals are discarded at once (a settle command each
    /// kind); with one, they wait for the broker to copy them.
    fn discard_disposals(&self, st: &mut PartitionState, now: u64) -> Result<(), BrokerError> {
        if st.config().has_dead_letter_queue {
            return Ok(());
        }
        let items = st.take_disposals();
        if items.is_empty() {
            return Ok(());
        }
        let mut by_kind: HashMap<i32, Vec<MessageRef>> = HashMap::new();
        for item in items {
            by_kind
                .entry(item.disposal.discard_kind() as i32)
                .or_default()
                .push(item.message);
        }
        let commands: Vec<LogCommand> = by_kind
            .into_iter()
            .map(|(kind, messages)| LogCommand {
                command: Some(Command::Settle(SettleCommand {
                    time_ms: now,
                    kind,
                    messages,
                    ..Default::default()
                })),
            })
            .collect();
        self.execute(st, &commands)?;
        Ok(())
    }

    /// Applies one settle operation to the tags of this partition. Failed tags change nothing.
    pub fn settle(
        &self,
        action: SettleAction,
        tags: &[DeliveryTag],
        delay_ms: u64,
    ) -> Result<Settled, BrokerError> {
        self.check_serving()?;
        let now = self.clock.now_ms();
        let mut st = self.state();
        let mut out = Settled::default();
        let mut seen = HashSet::new();
        let mut settled = Vec::new();
        for tag in tags {
            if !seen.insert(tag.offset) {
                out.failures.push(failure(
                    tag,
                    "the same message appears twice in one settle".to_owned(),
                ));
                continue;
            }
            let message = match st.check_tag(tag.offset, tag.attempt) {
                Ok(m) => m,
                Err(reason) => {
                    out.failures
                        .push(failure(tag, format!("partition {}: {reason}", self.id)));
                    continue;
                }
            };
            match action {
                SettleAction::Extend => {
                    let timeout = if delay_ms == 0 {
                        st.config().ack_timeout_ms
                    } else {
                        delay_ms
                    };
                    st.extend(tag.offset, timeout, now);
                }
                SettleAction::Nack if st.is_out_of_deliveries(&message) => {
                    st.dispose(tag.offset, Disposal::MaxDeliveries);
                }
                SettleAction::Reject if st.config().has_dead_letter_queue => {
                    st.dispose(tag.offset, Disposal::Rejected);
                }
                _ => settled.push(message),
            }
        }
        if !settled.is_empty() {
            let (kind, not_before_ms) = match action {
                SettleAction::Ack => (SettleKind::Ack, 0),
                SettleAction::Nack => (
                    SettleKind::Nack,
                    if delay_ms == 0 {
                        0
                    } else {
                        now.saturating_add(delay_ms)
                    },
                ),
                _ => (SettleKind::Reject, 0),
            };
            let command = SettleCommand {
                time_ms: now,
                kind: kind as i32,
                messages: settled,
                not_before_ms,
                reason: String::new(),
            };
            out.wait = self
                .execute(
                    &mut st,
                    &[LogCommand {
                        command: Some(Command::Settle(command)),
                    }],
                )?
                .0;
        }
        out.disposals = st.take_disposals();
        Ok(out)
    }

    /// Records that `items` were copied durably to the dead-letter queue; returns what to wait
    /// on.
    pub fn settle_dead_lettered(&self, items: &[DisposalItem]) -> Result<WaitPoint, BrokerError> {
        let now = self.clock.now_ms();
        let mut by_reason: HashMap<&'static str, Vec<MessageRef>> = HashMap::new();
        for item in items {
            by_reason
                .entry(item.disposal.reason())
                .or_default()
                .push(item.message);
        }
        let commands: Vec<LogCommand> = by_reason
            .into_iter()
            .map(|(reason, messages)| LogCommand {
                command: Some(Command::Settle(SettleCommand {
                    time_ms: now,
                    kind: SettleKind::DeadLettered as i32,
                    messages,
                    not_before_ms: 0,
                    reason: reason.to_owned(),
                })),
            })
            .collect();
        let mut st = self.state();
        Ok(self.execute(&mut st, &commands)?.0)
    }

    /// Puts back disposals that could not be dead-lettered, for the next timer pass.
    pub fn retry_disposals(&self, items: Vec<DisposalItem>) {
        self.state().retry_disposals(items);
    }

    /// One timer pass: ack deadlines, due delays, TTL at the head (reading ahead if needed),
    /// disposals, and deleting segments below the low-water mark.
    pub fn tick(&self) -> Result<Ticked, BrokerError> {
        if !self.is_serving() {
            return Ok(Ticked::default());
        }
        let now = self.clock.now_ms();
        let mut became_ready = {
            let mut st = self.state();
            st.expire_deadlines(now) + st.due(now) > 0
        };
        // Read ahead so an idle queue still finds its expired head; bounded by one batch per
        // level because only empty buffers are filled.
        self.fill()?;
        let (disposals, next_timer_ms, purge_point) = {
            let mut st = self.state();
            st.expire_buffered(now);
            self.discard_disposals(&mut st, now)?;
            became_ready |= st.has_ready();
            (st.take_disposals(), st.next_timer(), st.purge_point())
        };
        // A replicated log is purged by Raft after a snapshot (decision 0008), never here:
        // a lagging follower may still need those entries.
        if self.replica.is_none() && purge_point > self.log.first_index() {
            self.log.purge_before(purge_point)?;
        }
        Ok(Ticked {
            became_ready,
            disposals,
            next_timer_ms,
        })
    }

    /// Makes every delivery held by consumer `id` ready again; returns how many.
    pub fn release_consumer(&self, id: u64) -> usize {
        self.state().release_consumer(id)
    }

    /// Whether a delivery could be made now.
    pub fn has_ready(&self) -> bool {
        self.state().has_ready()
    }

    /// Unsettled messages and bytes.
    pub fn backlog(&self) -> (u64, u64) {
        self.state().backlog()
    }

    /// Counters and the age of the oldest unsettled message.
    pub fn stats(&self) -> (Counters, u64) {
        let now = self.clock.now_ms();
        let (counters, low_water, next) = {
            let st = self.state();
            (st.counters(now), st.low_water(), st.next_offset())
        };
        if low_water >= next {
            return (counters, 0);
        }
        let mut oldest = self.oldest.lock().unwrap_or_else(|p| p.into_inner());
        let publish_time = match *oldest {
            Some((offset, time)) if offset == low_water => Some(time),
            _ => self.read_publish(low_water).ok().map(|p| p.publish_time_ms),
        };
        if let Some(time) = publish_time {
            *oldest = Some((low_water, time));
        }
        (counters, publish_time.map_or(0, |t| now.saturating_sub(t)))
    }

    /// Entries of per-message memory.
    pub fn tracked_len(&self) -> usize {
        self.state().tracked_len()
    }
}

/// Rebuilds a partition's delivery state by replaying its log from the first retained entry up
/// to `upto` (inclusive; `u64::MAX` for everything).
pub fn replay(
    log: &dyn LogStore,
    config: StateConfig,
    upto: u64,
) -> Result<PartitionState, OpenError> {
    let first = log.first_index();
    let mut state = PartitionState::new(config, first);
    let mut next = first;
    let end = log.next_index().min(upto.saturating_add(1));
    while next < end {
        let entries = log.read_range(next, READ_BATCH_ENTRIES, READ_BATCH_BYTES)?;
        let Some(last) = entries.last() else { break };
        next = last.index + 1;
        for entry in entries.iter().take_while(|e| e.index < end) {
            state.apply_entry(entry)?;
        }
    }
    Ok(state)
}

fn failure(tag: &DeliveryTag, reason: String) -> SettleFailure {
    SettleFailure {
        tag: *tag,
        error: BrokerError::StaleDelivery { tag: *tag, reason },
    }
}

/// The stored form of a message accepted at `now`.
fn publish_command(message: Message, now: u64, ctx: &PublishContext) -> PublishCommand {
    let ttl = match (message.ttl_ms, ctx.message_ttl_ms) {
        (0, q) => q,
        (m, 0) => m,
        (m, q) => m.min(q),
    };
    PublishCommand {
        publish_time_ms: now,
        not_before_ms: if message.delay_ms == 0 {
            0
        } else {
            now.saturating_add(message.delay_ms)
        },
        expires_at_ms: if ttl == 0 { 0 } else { now.saturating_add(ttl) },
        message: Some(message),
        dead_letter_source: ctx.dead_letter_source.clone(),
        dead_letter_reason: ctx.dead_letter_reason.clone(),
    }
}
