//! [`PartitionState`]: the delivery state of one partition, rebuilt from its log.
//!
//! Two kinds of operation live here, kept apart on purpose (see decision 0003):
//! - [`PartitionState::apply`] applies one log command. It is deterministic given the entry
//!   (times come from the command), so replay on restart — and later a Raft follower — rebuilds
//!   the same durable state: which messages are settled, attempt counts, nack delays, counters,
//!   idempotency keys.
//! - Dispatch operations (`take`, `fill`, `due`, `expire_deadlines`, tag checks) are the
//!   leader's volatile bookkeeping: which consumer holds what until when, the read cursors and
//!   their small read-ahead buffers, the timer heaps. They take `now` as a parameter.
//!
//! Memory is bounded however deep the backlog: a message not yet reached by a cursor costs
//! nothing but a counter; per-message entries exist only for messages in flight, waiting for
//! redelivery, delayed, being dead-lettered, or settled above the low-water mark (a bit in a
//! roaring bitmap).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use roaring::RoaringTreemap;
use sluice_proto::storage::v1::{
    DeliverCommand, LogCommand, MessageRef, PublishCommand, SettleCommand, SettleKind,
    log_command::Command,
};

use super::consumer::ConsumerSlot;
use super::dedup::DedupWindow;
use super::entry::{self, BadEntry, entry_of, offset as offset_of, slot_of};
use super::outbox::{Outbox, Staged};
use super::rates::RateWindow;
use crate::log::Entry;

/// Priority levels (0..=9); one read cursor each.
pub const PRIORITY_LEVELS: usize = 10;
/// Consumer id of [`PartitionState`]'s `moved` slot (real consumers count from 1).
const MOVED_CONSUMER_ID: u64 = 0;

/// Why a message leaves its partition without an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposal {
    /// A consumer rejected it.
    Rejected,
    /// Its TTL passed.
    Expired,
    /// It was delivered `max_deliveries` times without an ack.
    MaxDeliveries,
}

impl Disposal {
    /// The `dead_letter_reason` recorded on the dead-letter copy.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::MaxDeliveries => "max-deliveries",
        }
    }

    /// The settle kind recorded when there is no dead-letter queue.
    pub fn discard_kind(self) -> SettleKind {
        match self {
            Self::Expired => SettleKind::Expire,
            Self::Rejected | Self::MaxDeliveries => SettleKind::Reject,
        }
    }
}

/// Where a tracked message is.
#[derive(Debug, Clone)]
enum Phase {
    /// The log says it was delivered, but no live consumer holds it (during replay, or on a
    /// follower). Becomes `Ready` when replay finishes.
    Delivered,
    /// Held by a consumer until the deadline.
    InFlight {
        consumer: Arc<ConsumerSlot>,
        deadline_ms: u64,
    },
    /// Waiting for redelivery.
    Ready,
    /// Not deliverable before `not_before_ms` (publish delay or nack delay).
    Delayed { not_before_ms: u64 },
    /// Being moved to the dead-letter queue or discarded; never dispatched.
    Disposing(Disposal),
}

/// Per-message memory for messages that are not simply waiting in the log.
#[derive(Debug)]
struct Tracked {
    /// Deliveries so far (0 = never delivered).
    attempt: u32,
    /// Of those, deliveries a leadership move cut short (see [`MessageRef::moves`]).
    moves: u32,
    /// When the last delivery was made (from its `DeliverCommand`): its consumer's deadline
    /// is this plus the ack timeout, which a new leader keeps.
    delivered_ms: u64,
    priority: u8,
    size: u32,
    expires_at_ms: u64,
    phase: Phase,
}

/// A message read ahead by a cursor, ready for its first delivery.
#[derive(Debug, Clone)]
pub struct Buffered {
    /// Its offset.
    pub offset: u64,
    /// Its stored command (with the body).
    pub publish: PublishCommand,
}

/// One priority level's read cursor.
#[derive(Debug, Default)]
struct Level {
    /// Next log index this level's cursor examines.
    cursor: u64,
    /// Untracked, unsettled messages of this level at or after the cursor, plus those in
    /// `buffer`. Only levels with `unseen > 0` are ever scanned.
    unseen: u64,
    /// Read-ahead of first deliveries, in log order (bounded by one read batch).
    buffer: VecDeque<Buffered>,
}

/// A message chosen for delivery by [`PartitionState::take`].
#[derive(Debug)]
pub struct Pick {
    /// The message, with its new attempt number.
    pub message: MessageRef,
    /// The body when it came from a read-ahead buffer; `None` means read it from the log.
    pub publish: Option<PublishCommand>,
}

/// A message that must leave the partition: discard it, or copy it to the dead-letter queue
/// and then settle it.
#[derive(Debug, Clone)]
pub struct DisposalItem {
    /// The message.
    pub message: MessageRef,
    /// Why.
    pub disposal: Disposal,
}

/// The settings the state machine needs from the queue spec.
#[derive(Debug, Clone, Copy)]
pub struct StateConfig {
    /// Default in-flight deadline.
    pub ack_timeout_ms: u64,
    /// 0 = unlimited.
    pub max_deliveries: u32,
    /// Whether disposals go to a dead-letter queue (else they are discarded).
    pub has_dead_letter_queue: bool,
    /// Idempotency window.
    pub dedup_window_ms: u64,
}

/// Counters of one partition (see the proto `Stats`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// Unsettled, not in flight, not delayed.
    pub ready: u64,
    /// Delivered and unsettled (including being dead-lettered).
    pub in_flight: u64,
    /// Waiting for a not-before time (once a cursor has reached them).
    pub delayed: u64,
    /// Moved to the dead-letter queue (over the retained log).
    pub dead_lettered: u64,
    /// Payload bytes of unsettled messages.
    pub bytes: u64,
    /// Expired by TTL (over the retained log).
    pub expired: u64,
    /// Unsettled messages.
    pub unsettled: u64,
    /// Confirmed publishes per second over the last minute.
    pub publish_rate: f64,
    /// Acks per second over the last minute.
    pub ack_rate: f64,
}

/// A log entry whose commands could not be decoded.
pub type BadCommand = BadEntry;

/// The delivery state of one partition.
#[derive(Debug)]
pub struct PartitionState {
    config: StateConfig,
    /// Every offset below it is settled (or not a message); it is the lowest unsettled offset,
    /// or `next_offset` when nothing is unsettled. Entries below its entry may be deleted.
    low_water: u64,
    /// Settled offsets (and non-message commands) at or above `low_water`.
    settled: RoaringTreemap,
    /// Offset after the last applied command.
    next_offset: u64,
    /// Every entry below it is complete (applied from the log, or sealed by the leader); the
    /// leader's open entry, if any, is this one.
    next_entry: u64,
    /// Commands in complete entries at or above `low_water`'s entry that hold more than one
    /// (one is the default), so `low_water` can step over the unused positions of an entry.
    counts: BTreeMap<u64, u32>,
    /// The leader's applied commands the proposer has not taken yet.
    outbox: Outbox,
    tracked: HashMap<u64, Tracked>,
    /// Messages waiting for redelivery, highest priority then lowest offset first.
    redeliver: BTreeSet<(u8, u64)>,
    /// (not-before, offset) of delayed messages; stale entries are skipped when popped.
    delays: BinaryHeap<Reverse<(u64, u64)>>,
    /// (deadline, offset, attempt) of in-flight messages; stale entries skipped when popped.
    deadlines: BinaryHeap<Reverse<(u64, u64, u32)>>,
    levels: Vec<Level>,
    /// Messages in `Phase::Disposing` not yet handed out by `take_disposals`.
    disposals: Vec<DisposalItem>,
    unsettled: u64,
    bytes: u64,
    in_flight: u64,
    delayed: u64,
    dead_lettered: u64,
    expired: u64,
    publish_rate: RateWindow,
    ack_rate: RateWindow,
    dedup: DedupWindow,
    /// Holds the deliveries a new leader keeps in flight for consumers that follow the move
    /// ([`PartitionState::finish_replay`]); no subscription has this id, and it has no limit.
    moved: Arc<ConsumerSlot>,
}

/// Read cursor state a fill must start from: `(level, first index to read)`.
pub type FillRequest = (usize, u64);

impl PartitionState {
    /// The state of a log whose first retained entry is `first_index` (nothing applied yet).
    pub fn new(config: StateConfig, first_index: u64) -> Self {
        let levels = (0..PRIORITY_LEVELS)
            .map(|_| Level {
                cursor: offset_of(first_index, 0),
                ..Level::default()
            })
            .collect();
        Self {
            config,
            low_water: offset_of(first_index, 0),
            settled: RoaringTreemap::new(),
            next_offset: offset_of(first_index, 0),
            next_entry: first_index,
            counts: BTreeMap::new(),
            outbox: Outbox::default(),
            tracked: HashMap::new(),
            redeliver: BTreeSet::new(),
            delays: BinaryHeap::new(),
            deadlines: BinaryHeap::new(),
            levels,
            disposals: Vec::new(),
            unsettled: 0,
            bytes: 0,
            in_flight: 0,
            delayed: 0,
            dead_lettered: 0,
            expired: 0,
            publish_rate: RateWindow::default(),
            ack_rate: RateWindow::default(),
            dedup: DedupWindow::new(config.dedup_window_ms),
            moved: Arc::new(ConsumerSlot::new(MOVED_CONSUMER_ID, usize::MAX)),
        }
    }

    /// Decodes and applies one log entry.
    pub fn apply_entry(&mut self, entry: &Entry) -> Result<(), BadCommand> {
        let commands = entry::decode(entry.index, entry.data.as_ref())?;
        self.apply_commands(entry.index, &commands);
        Ok(())
    }

    /// Applies the complete entry `index` holding `commands` (none for a Raft entry that
    /// carries no command). Deterministic: depends only on the state and the commands.
    pub fn apply_commands(&mut self, index: u64, commands: &[LogCommand]) {
        if commands.is_empty() {
            self.apply(offset_of(index, 0), &LogCommand::default());
        }
        for (slot, command) in (0..).zip(commands) {
            self.apply(offset_of(index, slot), command);
        }
        self.complete(index);
    }

    /// Applies `command` (encoded as `data`) as the leader, at the next position of the open
    /// entry; the proposer takes that entry whole later ([`PartitionState::take_staged`]).
    /// Returns the command's offset.
    pub fn stage(&mut self, epoch: u64, command: &LogCommand, data: Bytes) -> u64 {
        if let Some(sealed) = self.outbox.seal_if_full(data.len()) {
            self.complete(sealed);
        }
        let offset = self.outbox.push(epoch, self.next_entry, data);
        self.apply(offset, command);
        offset
    }

    /// The oldest entry staged by the leader, sealed: nothing more goes into it.
    pub fn take_staged(&mut self) -> Option<Staged> {
        let staged = self.outbox.take()?;
        self.complete(staged.index);
        Some(staged)
    }

    /// Applies the next `n` entries as empty, as the leader, for a membership change that
    /// will append at most `n` entries (a membership entry is empty to the delivery state, and
    /// the proposer fills indices the change leaves unused with empty entries). Everything
    /// staged must have been taken first. Returns the reserved indices.
    pub fn reserve_entries(&mut self, n: u64) -> std::ops::RangeInclusive<u64> {
        debug_assert!(
            self.outbox.is_empty(),
            "staged entries precede a reservation"
        );
        let first = self.next_entry;
        for index in first..first + n {
            self.apply_commands(index, &[]);
        }
        first..=first + n - 1
    }

    /// Entry `index` holds all its commands.
    fn complete(&mut self, index: u64) {
        if index >= self.next_entry {
            self.next_entry = index + 1;
            self.advance_low_water();
        }
    }

    /// Applies the command stored at `offset`.
    fn apply(&mut self, offset: u64, command: &LogCommand) {
        self.next_offset = self.next_offset.max(offset + 1);
        let slot = slot_of(offset);
        if slot > 0 {
            let count = self.counts.entry(entry_of(offset)).or_insert(1);
            *count = (*count).max(slot + 1);
        }
        match &command.command {
            Some(Command::Publish(publish)) => self.apply_publish(offset, publish),
            Some(Command::Deliver(deliver)) => {
                self.mark_settled(offset);
                self.apply_deliver(deliver);
            }
            Some(Command::Settle(settle)) => {
                self.mark_settled(offset);
                self.apply_settle(settle);
            }
            // A batch never reaches here (`entry::decode` refuses nested batches).
            Some(Command::Batch(_)) | None => self.mark_settled(offset),
        }
    }

    fn apply_publish(&mut self, offset: u64, publish: &PublishCommand) {
        let (priority, size) = match &publish.message {
            Some(m) => (m.priority.min(9) as usize, m.payload.len() as u64),
            None => (0, 0),
        };
        self.unsettled += 1;
        self.bytes += size;
        self.levels[priority].unseen += 1;
        self.publish_rate.record(publish.publish_time_ms, 1);
        if let Some(m) = &publish.message
            && !m.idempotency_key.is_empty()
        {
            self.dedup
                .insert(&m.idempotency_key, offset, publish.publish_time_ms);
        }
    }

    fn apply_deliver(&mut self, deliver: &DeliverCommand) {
        for r in &deliver.messages {
            if self.is_settled(r.offset) {
                continue;
            }
            if let Some(t) = self.tracked.get_mut(&r.offset) {
                t.attempt = r.attempt;
                t.moves = r.moves;
                t.delivered_ms = deliver.time_ms;
                self.set_phase(r.offset, Phase::Delivered);
            } else {
                self.untrack_unseen(r.priority);
                self.insert_tracked(r, r.attempt, Phase::Delivered);
                if let Some(t) = self.tracked.get_mut(&r.offset) {
                    t.delivered_ms = deliver.time_ms;
                }
            }
        }
    }

    fn apply_settle(&mut self, settle: &SettleCommand) {
        let kind = SettleKind::try_from(settle.kind).unwrap_or(SettleKind::Unspecified);
        for r in &settle.messages {
            if self.is_settled(r.offset) || r.offset >= self.next_offset {
                continue;
            }
            match kind {
                SettleKind::Nack => {
                    if self.tracked.contains_key(&r.offset) {
                        let phase = if settle.not_before_ms == 0 {
                            Phase::Ready
                        } else {
                            Phase::Delayed {
                                not_before_ms: settle.not_before_ms,
                            }
                        };
                        self.set_phase(r.offset, phase);
                    }
                }
                SettleKind::Unspecified => {}
                SettleKind::Ack
                | SettleKind::Reject
                | SettleKind::Expire
                | SettleKind::DeadLettered => {
                    if self.tracked.contains_key(&r.offset) {
                        self.leave_phase(r.offset);
                        self.tracked.remove(&r.offset);
                    } else {
                        self.untrack_unseen(r.priority);
                    }
                    self.unsettled = self.unsettled.saturating_sub(1);
                    self.bytes = self.bytes.saturating_sub(u64::from(r.size));
                    match kind {
                        SettleKind::Ack => self.ack_rate.record(settle.time_ms, 1),
                        SettleKind::Expire => self.expired += 1,
                        SettleKind::DeadLettered => {
                            self.dead_lettered += 1;
                            if settle.reason == Disposal::Expired.reason() {
                                self.expired += 1;
                            }
                        }
                        _ => {}
                    }
                    self.mark_settled(r.offset);
                }
            }
        }
    }

    /// Serves the replayed state. After a restart of a single agent (`moved` false) every
    /// delivery the log records as unsettled is ready again at once and counts as the attempt
    /// it was: its consumer's connection died with the agent. After a leadership move (`moved`,
    /// a new leader of a replicated partition) the move cut those deliveries short, not their
    /// consumers (decision 0018): each stays in flight until its consumer's own deadline, so a
    /// consumer that follows the move settles it by its tag, and one not settled by then is
    /// ready again without counting against `max_deliveries`. Messages already ready are queued
    /// for dead-lettering when they used up their deliveries.
    pub fn finish_replay(&mut self, moved: bool, now_ms: u64) {
        let offsets: Vec<u64> = self
            .tracked
            .iter()
            .filter(|(_, t)| matches!(t.phase, Phase::Delivered | Phase::Ready))
            .map(|(o, _)| *o)
            .collect();
        for offset in offsets {
            let Some(t) = self.tracked.get(&offset) else {
                continue;
            };
            if !moved || !matches!(t.phase, Phase::Delivered) {
                self.make_ready(offset);
                continue;
            }
            let deadline_ms = t.delivered_ms.saturating_add(self.config.ack_timeout_ms);
            if deadline_ms > now_ms {
                let consumer = self.moved.clone();
                self.set_phase(
                    offset,
                    Phase::InFlight {
                        consumer,
                        deadline_ms,
                    },
                );
            } else {
                self.moved_ready(offset);
            }
        }
    }

    /// Ready again after a delivery that a leadership move cut short: one more free attempt.
    fn moved_ready(&mut self, offset: u64) {
        if let Some(t) = self.tracked.get_mut(&offset) {
            t.moves = t.moves.saturating_add(1).min(t.attempt);
        }
        self.make_ready(offset);
    }

    /// Deliveries of `t` that count against `max_deliveries`.
    fn counted(attempt: u32, moves: u32) -> u32 {
        attempt.saturating_sub(moves)
    }

    // ----- bookkeeping helpers -----

    fn is_settled(&self, offset: u64) -> bool {
        offset < self.low_water || self.settled.contains(offset)
    }

    fn mark_settled(&mut self, offset: u64) {
        if offset < self.low_water {
            return;
        }
        self.settled.insert(offset);
        self.advance_low_water();
    }

    /// Advances the low-water mark over the settled prefix, stepping from the end of a
    /// complete entry to the next entry; each offset is passed once, so this is amortised
    /// O(1) per command.
    fn advance_low_water(&mut self) {
        loop {
            while self.settled.remove(self.low_water) {
                self.low_water += 1;
            }
            let (index, slot) = (entry_of(self.low_water), slot_of(self.low_water));
            if slot == 0 || index >= self.next_entry {
                return;
            }
            let count = self.counts.get(&index).copied().unwrap_or(1);
            if slot < count {
                return;
            }
            self.counts.remove(&index);
            self.low_water = offset_of(index + 1, 0);
        }
    }

    fn untrack_unseen(&mut self, priority: u32) {
        let level = &mut self.levels[priority.min(9) as usize];
        level.unseen = level.unseen.saturating_sub(1);
    }

    fn insert_tracked(&mut self, r: &MessageRef, attempt: u32, phase: Phase) {
        let tracked = Tracked {
            attempt,
            moves: r.moves.min(attempt),
            delivered_ms: 0,
            priority: r.priority.min(9) as u8,
            size: r.size,
            expires_at_ms: r.expires_at_ms,
            phase: Phase::Ready,
        };
        self.tracked.insert(r.offset, tracked);
        // Enter the real phase through set_phase so every counter and index is updated in one
        // place; a transient `Ready` must not linger in `redeliver`.
        self.redeliver_insert_guard(r.offset, phase);
    }

    fn redeliver_insert_guard(&mut self, offset: u64, phase: Phase) {
        if let Some(t) = self.tracked.get_mut(&offset) {
            t.phase = phase.clone();
            let priority = t.priority;
            let attempt = t.attempt;
            self.enter_phase(offset, priority, attempt, &phase);
        }
    }

    fn set_phase(&mut self, offset: u64, phase: Phase) {
        if !self.tracked.contains_key(&offset) {
            return;
        }
        self.leave_phase(offset);
        self.redeliver_insert_guard(offset, phase);
    }

    /// Undoes the counters and indexes of the current phase (the phase value stays until
    /// replaced).
    fn leave_phase(&mut self, offset: u64) {
        let Some(t) = self.tracked.get(&offset) else {
            return;
        };
        match &t.phase {
            Phase::Delivered | Phase::Disposing(_) => {
                self.in_flight = self.in_flight.saturating_sub(1)
            }
            Phase::InFlight { consumer, .. } => {
                consumer.release();
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            Phase::Ready => {
                self.redeliver.remove(&(9 - t.priority, offset));
            }
            Phase::Delayed { .. } => self.delayed = self.delayed.saturating_sub(1),
        }
    }

    fn enter_phase(&mut self, offset: u64, priority: u8, attempt: u32, phase: &Phase) {
        match phase {
            Phase::Delivered => self.in_flight += 1,
            Phase::Disposing(disposal) => {
                self.in_flight += 1;
                if let Some(message) = self.message_ref(offset, 0) {
                    self.disposals.push(DisposalItem {
                        message,
                        disposal: *disposal,
                    });
                }
            }
            Phase::InFlight {
                consumer,
                deadline_ms,
            } => {
                consumer.acquire(1);
                self.in_flight += 1;
                self.deadlines
                    .push(Reverse((*deadline_ms, offset, attempt)));
            }
            Phase::Ready => {
                self.redeliver.insert((9 - priority, offset));
            }
            Phase::Delayed { not_before_ms } => {
                self.delayed += 1;
                self.delays.push(Reverse((*not_before_ms, offset)));
            }
        }
    }

    fn message_ref(&self, offset: u64, attempt_delta: u32) -> Option<MessageRef> {
        let t = self.tracked.get(&offset)?;
        Some(MessageRef {
            offset,
            attempt: t.attempt + attempt_delta,
            priority: u32::from(t.priority),
            size: t.size,
            expires_at_ms: t.expires_at_ms,
            moves: t.moves,
        })
    }

    /// Ready for redelivery, or disposal when the deliveries are used up.
    fn make_ready(&mut self, offset: u64) {
        let Some(t) = self.tracked.get(&offset) else {
            return;
        };
        if self.config.max_deliveries > 0
            && Self::counted(t.attempt, t.moves) >= self.config.max_deliveries
        {
            self.set_phase(offset, Phase::Disposing(Disposal::MaxDeliveries));
        } else {
            self.set_phase(offset, Phase::Ready);
        }
    }

    fn buffered_ref(b: &Buffered) -> MessageRef {
        let (priority, size) = match &b.publish.message {
            Some(m) => (
                m.priority.min(9),
                u32::try_from(m.payload.len()).unwrap_or(u32::MAX),
            ),
            None => (0, 0),
        };
        MessageRef {
            offset: b.offset,
            attempt: 0,
            priority,
            size,
            expires_at_ms: b.publish.expires_at_ms,
            moves: 0,
        }
    }

    // ----- leader dispatch -----

    /// Chooses up to `max` messages for delivery: redeliveries first, then first deliveries
    /// from the read-ahead buffers, highest priority first. The picks are not yet delivered:
    /// the caller appends a [`DeliverCommand`] for them, applies it, then calls
    /// [`PartitionState::hand_over`].
    pub fn take(&mut self, max: usize, now_ms: u64) -> Vec<Pick> {
        let mut picks = Vec::new();
        while picks.len() < max {
            let Some(&(_, offset)) = self.redeliver.first() else {
                break;
            };
            let Some(message) = self.message_ref(offset, 1) else {
                self.redeliver.pop_first();
                continue;
            };
            if message.expires_at_ms != 0 && message.expires_at_ms <= now_ms {
                self.set_phase(offset, Phase::Disposing(Disposal::Expired));
                continue;
            }
            // Out of `redeliver` now; `apply(Deliver)` then records the new attempt.
            self.set_phase(offset, Phase::Delivered);
            picks.push(Pick {
                message,
                publish: None,
            });
        }
        for level in (0..PRIORITY_LEVELS).rev() {
            while picks.len() < max {
                let Some(b) = self.levels[level].buffer.pop_front() else {
                    break;
                };
                if self.is_settled(b.offset) || self.tracked.contains_key(&b.offset) {
                    continue;
                }
                let mut message = Self::buffered_ref(&b);
                if let Some(phase) = self.hold_back(&b.publish, now_ms) {
                    self.untrack_unseen(message.priority);
                    self.insert_tracked(&message, 0, phase);
                    continue;
                }
                message.attempt = 1;
                picks.push(Pick {
                    message,
                    publish: Some(b.publish),
                });
            }
        }
        picks
    }

    /// Whether a message reached by a cursor must not be delivered now: expired (disposal) or
    /// not yet due (delayed).
    fn hold_back(&self, publish: &PublishCommand, now_ms: u64) -> Option<Phase> {
        if publish.expires_at_ms != 0 && publish.expires_at_ms <= now_ms {
            Some(Phase::Disposing(Disposal::Expired))
        } else if publish.not_before_ms > now_ms {
            Some(Phase::Delayed {
                not_before_ms: publish.not_before_ms,
            })
        } else {
            None
        }
    }

    /// Records that the applied deliveries of `picks` are held by `consumer` until
    /// `now + ack_timeout`.
    pub fn hand_over(&mut self, picks: &[Pick], consumer: &Arc<ConsumerSlot>, now_ms: u64) {
        let deadline_ms = now_ms.saturating_add(self.config.ack_timeout_ms);
        for pick in picks {
            self.set_phase(
                pick.message.offset,
                Phase::InFlight {
                    consumer: consumer.clone(),
                    deadline_ms,
                },
            );
        }
    }

    /// The highest level whose buffer is empty while it still has unseen messages, and the
    /// log entry its cursor must read from. `None` when every level with work has a buffer.
    pub fn fill_request(&self, first_index: u64) -> Option<FillRequest> {
        (0..PRIORITY_LEVELS).rev().find_map(|level| {
            let l = &self.levels[level];
            (l.unseen > 0 && l.buffer.is_empty()).then(|| {
                (
                    level,
                    entry_of(l.cursor.max(self.low_water)).max(first_index),
                )
            })
        })
    }

    /// Feeds entries read from the log at `level`'s cursor: first deliveries go to the buffer,
    /// expired ones to disposal, not-yet-due ones to the delay heap. Entries the cursor has
    /// already passed (a concurrent fill) are skipped.
    pub fn fill(&mut self, level: usize, entries: &[Entry], now_ms: u64) -> Result<(), BadCommand> {
        for entry in entries {
            if offset_of(entry.index + 1, 0) <= self.levels[level].cursor
                || offset_of(entry.index, 0) >= self.next_offset
            {
                continue;
            }
            for (slot, command) in (0..).zip(entry::decode(entry.index, entry.data.as_ref())?) {
                let offset = offset_of(entry.index, slot);
                self.read_ahead(level, offset, command, now_ms);
            }
        }
        if let Some(last) = entries.last() {
            let l = &mut self.levels[level];
            l.cursor = l
                .cursor
                .max(offset_of(last.index + 1, 0).min(self.next_offset));
        }
        Ok(())
    }

    /// One command reached by `level`'s cursor.
    fn read_ahead(&mut self, level: usize, offset: u64, command: LogCommand, now_ms: u64) {
        if offset < self.levels[level].cursor || offset >= self.next_offset {
            return;
        }
        self.levels[level].cursor = offset + 1;
        if self.is_settled(offset) || self.tracked.contains_key(&offset) {
            return;
        }
        let Some(Command::Publish(publish)) = command.command else {
            return;
        };
        let priority = publish.message.as_ref().map_or(0, |m| m.priority.min(9)) as usize;
        if priority != level {
            return;
        }
        let b = Buffered { offset, publish };
        if let Some(phase) = self.hold_back(&b.publish, now_ms) {
            let message = Self::buffered_ref(&b);
            self.untrack_unseen(message.priority);
            self.insert_tracked(&message, 0, phase);
        } else {
            self.levels[level].buffer.push_back(b);
        }
    }

    /// Drops read-ahead messages whose TTL passed (into disposal), so an idle queue still
    /// expires its head. Returns how many expired.
    pub fn expire_buffered(&mut self, now_ms: u64) -> usize {
        let mut expired = Vec::new();
        for level in &mut self.levels {
            level.buffer.retain(|b| {
                let keep = b.publish.expires_at_ms == 0 || b.publish.expires_at_ms > now_ms;
                if !keep {
                    expired.push(Self::buffered_ref(b));
                }
                keep
            });
        }
        let n = expired.len();
        for message in expired {
            self.untrack_unseen(message.priority);
            self.insert_tracked(&message, 0, Phase::Disposing(Disposal::Expired));
        }
        n
    }

    /// Moves delayed messages whose time has come to ready. Returns how many.
    pub fn due(&mut self, now_ms: u64) -> usize {
        let mut n = 0;
        while let Some(Reverse((not_before_ms, offset))) = self.delays.peek().copied() {
            if not_before_ms > now_ms {
                break;
            }
            self.delays.pop();
            let current = matches!(self.tracked.get(&offset),
                Some(Tracked { phase: Phase::Delayed { not_before_ms: nb }, .. }) if *nb == not_before_ms);
            if current {
                self.make_ready(offset);
                n += 1;
            }
        }
        n
    }

    /// Makes deliveries whose ack deadline passed ready again (or disposes of them when their
    /// deliveries are used up). Returns how many.
    pub fn expire_deadlines(&mut self, now_ms: u64) -> usize {
        let mut n = 0;
        while let Some(Reverse((deadline, offset, attempt))) = self.deadlines.peek().copied() {
            if deadline > now_ms {
                break;
            }
            self.deadlines.pop();
            let held = match self.tracked.get(&offset) {
                Some(Tracked {
                    phase:
                        Phase::InFlight {
                            deadline_ms,
                            consumer,
                        },
                    attempt: a,
                    ..
                }) if *deadline_ms == deadline && *a == attempt => Some(consumer.id),
                _ => None,
            };
            match held {
                // Kept through a move and not settled by its consumer in time: the move cut it
                // short, its consumer did not fail it.
                Some(MOVED_CONSUMER_ID) => self.moved_ready(offset),
                Some(_) => self.make_ready(offset),
                None => continue,
            }
            n += 1;
        }
        n
    }

    /// Makes every delivery held by consumer `id` ready again. Returns how many.
    pub fn release_consumer(&mut self, id: u64) -> usize {
        let offsets: Vec<u64> = self
            .tracked
            .iter()
            .filter(
                |(_, t)| matches!(&t.phase, Phase::InFlight { consumer, .. } if consumer.id == id),
            )
            .map(|(o, _)| *o)
            .collect();
        for &offset in &offsets {
            self.make_ready(offset);
        }
        offsets.len()
    }

    /// The in-flight message a tag names, if the tag is current; else why not.
    pub fn check_tag(&self, offset: u64, attempt: u32) -> Result<MessageRef, String> {
        match self.tracked.get(&offset) {
            Some(
                t @ Tracked {
                    phase: Phase::InFlight { .. },
                    ..
                },
            ) if t.attempt == attempt => self
                .message_ref(offset, 0)
                .ok_or_else(|| "unknown delivery".to_owned()),
            Some(Tracked {
                phase: Phase::InFlight { .. },
                attempt: current,
                ..
            }) => Err(format!(
                "stale delivery tag: attempt {attempt}, the current delivery is attempt {current}"
            )),
            Some(_) => Err(format!("message at offset {offset} is not in flight")),
            None if offset < self.next_offset && self.is_settled(offset) => {
                Err(format!("message at offset {offset} is already settled"))
            }
            None => Err(format!("no delivery of a message at offset {offset}")),
        }
    }

    /// Moves an in-flight message's deadline to `now + timeout_ms`.
    pub fn extend(&mut self, offset: u64, timeout_ms: u64, now_ms: u64) {
        if let Some(Tracked {
            phase: Phase::InFlight { consumer, .. },
            ..
        }) = self.tracked.get(&offset)
        {
            let consumer = consumer.clone();
            let deadline_ms = now_ms.saturating_add(timeout_ms);
            self.set_phase(
                offset,
                Phase::InFlight {
                    consumer,
                    deadline_ms,
                },
            );
        }
    }

    /// Starts disposing of an in-flight message (reject, or nack past `max_deliveries`).
    pub fn dispose(&mut self, offset: u64, disposal: Disposal) {
        self.set_phase(offset, Phase::Disposing(disposal));
    }

    /// Whether a nack of this in-flight message must dispose of it instead.
    pub fn is_out_of_deliveries(&self, message: &MessageRef) -> bool {
        self.config.max_deliveries > 0
            && Self::counted(message.attempt, message.moves) >= self.config.max_deliveries
    }

    /// Hands out the messages waiting for disposal (they stay `Disposing` until settled).
    pub fn take_disposals(&mut self) -> Vec<DisposalItem> {
        std::mem::take(&mut self.disposals)
    }

    /// Puts back disposals whose dead-lettering failed, to be retried.
    pub fn retry_disposals(&mut self, items: Vec<DisposalItem>) {
        self.disposals.extend(items);
    }

    /// The first offset of an idempotency key published within the window.
    pub fn dedup(&self, key: &str, now_ms: u64) -> Option<u64> {
        self.dedup.get(key, now_ms)
    }

    /// Whether something can be delivered at once without reading further (redeliveries or
    /// unseen messages).
    pub fn has_ready(&self) -> bool {
        !self.redeliver.is_empty() || self.levels.iter().any(|l| l.unseen > 0)
    }

    /// The earliest time a timer must fire (delays and deadlines), if any.
    pub fn next_timer(&self) -> Option<u64> {
        let delay = self.delays.peek().map(|Reverse((t, _))| *t);
        let deadline = self.deadlines.peek().map(|Reverse((t, _, _))| *t);
        match (delay, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Lowest unsettled offset.
    pub fn low_water(&self) -> u64 {
        self.low_water
    }

    /// Every log entry below this one holds only settled commands and may be purged.
    pub fn purge_point(&self) -> u64 {
        entry_of(self.low_water)
    }

    /// Offset after the last applied command.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Entry after the last complete one (the leader's open entry, if it has one).
    pub fn next_entry(&self) -> u64 {
        self.next_entry
    }

    /// Unsettled messages and their payload bytes (for backlog limits).
    pub fn backlog(&self) -> (u64, u64) {
        (self.unsettled, self.bytes)
    }

    /// The settings.
    pub fn config(&self) -> StateConfig {
        self.config
    }

    /// The partition's counters at `now_ms`.
    pub fn counters(&self, now_ms: u64) -> Counters {
        Counters {
            ready: self.unsettled.saturating_sub(self.in_flight + self.delayed),
            in_flight: self.in_flight,
            delayed: self.delayed,
            dead_lettered: self.dead_lettered,
            bytes: self.bytes,
            expired: self.expired,
            unsettled: self.unsettled,
            publish_rate: self.publish_rate.per_second(now_ms),
            ack_rate: self.ack_rate.per_second(now_ms),
        }
    }

    /// Entries of per-message memory (tracked messages), for memory tests.
    pub fn tracked_len(&self) -> usize {
        self.tracked.len()
    }
}

/// The delivery state of a partition, shared with its Raft state machine when replicated.
pub type SharedState = Arc<Mutex<PartitionState>>;

/// Locks a partition's state.
pub fn lock_state(state: &SharedState) -> MutexGuard<'_, PartitionState> {
    // Every mutation of the state runs to completion without panicking on input; if a bug ever
    // panicked mid-update, continuing with the state is no worse than poisoning every later
    // request of the partition.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
#[path = "state_test.rs"]
mod tests;
