//! Unit tests of the partition state machine, driven by commands and explicit times (no log).

use std::sync::Arc;

use prost::Message as _;

use sluice_proto::storage::v1::{
    DeliverCommand, LogCommand, MessageRef, PublishCommand, SettleCommand, SettleKind,
    log_command::Command,
};
use sluice_proto::v1::Message;

use super::*;
use crate::queue::consumer::ConsumerSlot;

const T0: u64 = 1_000_000;

fn config() -> StateConfig {
    StateConfig {
        ack_timeout_ms: 1_000,
        max_deliveries: 0,
        has_dead_letter_queue: false,
        dedup_window_ms: 60_000,
    }
}

/// A state plus the log it was built from, so tests can replay it.
struct Harness {
    state: PartitionState,
    log: Vec<Entry>,
}

impl Harness {
    fn new(config: StateConfig) -> Self {
        Self {
            state: PartitionState::new(config, 1),
            log: Vec::new(),
        }
    }

    fn append(&mut self, command: Command) -> u64 {
        let index = self.log.len() as u64 + 1;
        let command = LogCommand {
            command: Some(command),
        };
        self.log.push(Entry {
            index,
            term: 1,
            data: command.encode_to_vec().into(),
        });
        self.state
            .apply_commands(index, std::slice::from_ref(&command));
        crate::queue::entry::offset(index, 0)
    }

    fn publish(&mut self, publish: PublishCommand) -> u64 {
        self.append(Command::Publish(publish))
    }

    fn message(&mut self, payload: &str) -> u64 {
        self.publish(PublishCommand {
            message: Some(Message {
                payload: payload.as_bytes().to_vec(),
                ..Default::default()
            }),
            publish_time_ms: T0,
            ..Default::default()
        })
    }

    /// What a leader does to deliver: fill from its own log, take, record, hand over.
    fn deliver(&mut self, max: usize, consumer: &Arc<ConsumerSlot>, now: u64) -> Vec<MessageRef> {
        while let Some((level, from)) = self.state.fill_request(1) {
            let entries: Vec<Entry> = self
                .log
                .iter()
                .filter(|e| e.index >= from)
                .cloned()
                .collect();
            if entries.is_empty() {
                break;
            }
            self.state
                .fill(level, &entries, now)
                .expect("valid commands");
        }
        let picks = self.state.take(max, now);
        if picks.is_empty() {
            return Vec::new();
        }
        let messages: Vec<MessageRef> = picks.iter().map(|p| p.message).collect();
        self.append(Command::Deliver(DeliverCommand {
            time_ms: now,
            messages: messages.clone(),
        }));
        self.state.hand_over(&picks, consumer, now);
        messages
    }

    fn settle(&mut self, kind: SettleKind, messages: Vec<MessageRef>, not_before_ms: u64) {
        self.append(Command::Settle(SettleCommand {
            time_ms: T0,
            kind: kind as i32,
            messages,
            not_before_ms,
            reason: String::new(),
        }));
    }

    fn replayed(&self) -> PartitionState {
        let mut state = PartitionState::new(self.state.config(), 1);
        for entry in &self.log {
            state.apply_entry(entry).expect("valid commands");
        }
        state.finish_replay(false, 0);
        state
    }
}

fn consumer() -> Arc<ConsumerSlot> {
    Arc::new(ConsumerSlot::new(1, 1_000))
}

#[test]
fn first_deliveries_follow_publish_order_and_acks_move_the_low_water_mark() {
    let mut h = Harness::new(config());
    let a = h.message("a");
    let b = h.message("b");
    let c = h.message("c");
    let slot = consumer();
    let got = h.deliver(2, &slot, T0);
    assert_eq!(got.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![a, b]);
    assert!(got.iter().all(|m| m.attempt == 1));
    assert_eq!(slot.unsettled(), 2);
    h.settle(SettleKind::Ack, vec![got[1]], 0);
    assert_eq!(h.state.low_water(), a, "a is still unsettled");
    h.settle(SettleKind::Ack, vec![got[0]], 0);
    assert_eq!(h.state.low_water(), c, "everything below c is settled");
    assert_eq!(slot.unsettled(), 0);
    let counters = h.state.counters(T0);
    assert_eq!(
        (counters.ready, counters.in_flight, counters.unsettled),
        (1, 0, 1)
    );
}

#[test]
fn an_expired_deadline_makes_the_message_ready_again_with_the_next_attempt() {
    let mut h = Harness::new(config());
    let a = h.message("a");
    let slot = consumer();
    let first = h.deliver(10, &slot, T0);
    assert_eq!(h.state.expire_deadlines(T0 + 999), 0, "not yet");
    assert_eq!(h.state.expire_deadlines(T0 + 1_000), 1);
    assert_eq!(
        slot.unsettled(),
        0,
        "the timed-out delivery no longer counts against prefetch"
    );
    assert!(
        h.state.check_tag(a, first[0].attempt).is_err(),
        "the old tag is stale now"
    );
    let second = h.deliver(10, &slot, T0 + 1_000);
    assert_eq!((second[0].offset, second[0].attempt), (a, 2));
}

#[test]
fn extend_moves_the_deadline() {
    let mut h = Harness::new(config());
    let a = h.message("a");
    let slot = consumer();
    h.deliver(1, &slot, T0);
    h.state.extend(a, 5_000, T0 + 500);
    assert_eq!(
        h.state.expire_deadlines(T0 + 1_000),
        0,
        "the first deadline is stale"
    );
    assert_eq!(h.state.expire_deadlines(T0 + 5_500), 1);
}

#[test]
fn a_nack_with_delay_waits_then_redelivers_before_new_messages() {
    let mut h = Harness::new(config());
    let a = h.message("a");
    let slot = consumer();
    let got = h.deliver(1, &slot, T0);
    h.settle(SettleKind::Nack, got, T0 + 2_000);
    let b = h.message("b");
    assert_eq!(h.state.counters(T0).delayed, 1);
    let next = h.deliver(1, &slot, T0 + 10);
    assert_eq!(next[0].offset, b, "a is delayed");
    assert_eq!(h.state.due(T0 + 1_999), 0);
    assert_eq!(h.state.due(T0 + 2_000), 1);
    h.message("c");
    let again = h.deliver(1, &slot, T0 + 2_000);
    assert_eq!(
        (again[0].offset, again[0].attempt),
        (a, 2),
        "redeliveries come first"
    );
}

#[test]
fn replay_keeps_acks_and_attempts_and_makes_in_flight_ready() {
    let mut h = Harness::new(config());
    let a = h.message("a");
    let b = h.message("b");
    let c = h.message("c");
    let slot = consumer();
    let got = h.deliver(2, &slot, T0);
    h.settle(SettleKind::Ack, vec![got[0]], 0);
    let mut replayed = h.replayed();
    let counters = replayed.counters(T0);
    assert_eq!((counters.unsettled, counters.in_flight), (2, 0));
    let fresh = consumer();
    // Drive the replayed state with the same log.
    let mut h2 = Harness {
        state: replayed,
        log: h.log.clone(),
    };
    let again = h2.deliver(10, &fresh, T0);
    let offsets: Vec<(u64, u32)> = again.iter().map(|m| (m.offset, m.attempt)).collect();
    assert_eq!(
        offsets,
        vec![(b, 2), (c, 1)],
        "b was in flight (attempt 2 now), a stays acked"
    );
    assert!(!offsets.iter().any(|(o, _)| *o == a));
    replayed = h2.replayed();
    assert_eq!(replayed.low_water(), b);
}

#[test]
fn max_deliveries_sends_the_message_to_disposal_after_the_last_attempt() {
    let mut h = Harness::new(StateConfig {
        max_deliveries: 2,
        has_dead_letter_queue: true,
        ..config()
    });
    let a = h.message("a");
    let slot = consumer();
    let first = h.deliver(1, &slot, T0);
    h.settle(SettleKind::Nack, first, 0);
    let second = h.deliver(1, &slot, T0);
    assert_eq!(second[0].attempt, 2);
    assert!(h.state.is_out_of_deliveries(&second[0]));
    h.state.expire_deadlines(T0 + 1_000);
    let disposals = h.state.take_disposals();
    assert_eq!(disposals.len(), 1);
    assert_eq!(
        (disposals[0].message.offset, disposals[0].disposal),
        (a, Disposal::MaxDeliveries)
    );
    assert!(
        h.deliver(1, &slot, T0 + 1_000).is_empty(),
        "a disposing message is never delivered"
    );
    h.append(Command::Settle(SettleCommand {
        time_ms: T0,
        kind: SettleKind::DeadLettered as i32,
        messages: vec![disposals[0].message],
        not_before_ms: 0,
        reason: "max-deliveries".into(),
    }));
    let counters = h.state.counters(T0);
    assert_eq!(
        (
            counters.dead_lettered,
            counters.unsettled,
            counters.in_flight
        ),
        (1, 0, 0)
    );
}

#[test]
fn expired_and_delayed_messages_are_held_back_when_the_cursor_reaches_them() {
    let mut h = Harness::new(config());
    let expired = h.publish(PublishCommand {
        message: Some(Message::default()),
        publish_time_ms: T0,
        expires_at_ms: T0 + 10,
        ..Default::default()
    });
    let delayed = h.publish(PublishCommand {
        message: Some(Message::default()),
        publish_time_ms: T0,
        not_before_ms: T0 + 500,
        ..Default::default()
    });
    let slot = consumer();
    assert!(h.deliver(10, &slot, T0 + 20).is_empty());
    let disposals = h.state.take_disposals();
    assert_eq!(
        disposals
            .iter()
            .map(|d| d.message.offset)
            .collect::<Vec<_>>(),
        vec![expired]
    );
    assert_eq!(h.state.counters(T0).delayed, 1);
    assert_eq!(h.state.next_timer(), Some(T0 + 500));
    h.state.due(T0 + 500);
    let got = h.deliver(10, &slot, T0 + 500);
    assert_eq!((got[0].offset, got[0].attempt), (delayed, 1));
}

#[test]
fn higher_priorities_are_delivered_first_and_fifo_within_a_priority() {
    let mut h = Harness::new(config());
    let mut publish = |p: u32| {
        h.publish(PublishCommand {
            message: Some(Message {
                priority: p,
                ..Default::default()
            }),
            publish_time_ms: T0,
            ..Default::default()
        })
    };
    let low1 = publish(0);
    let high1 = publish(7);
    let low2 = publish(0);
    let high2 = publish(7);
    let slot = consumer();
    let got: Vec<u64> = h.deliver(10, &slot, T0).iter().map(|m| m.offset).collect();
    assert_eq!(got, vec![high1, high2, low1, low2]);
}

#[test]
fn tags_of_other_attempts_or_settled_messages_are_refused() {
    let mut h = Harness::new(config());
    let a = h.message("a");
    let slot = consumer();
    let got = h.deliver(1, &slot, T0);
    assert!(
        h.state
            .check_tag(a, 2)
            .expect_err("stale")
            .contains("stale")
    );
    assert!(h.state.check_tag(a, 1).is_ok());
    h.settle(SettleKind::Ack, got, 0);
    assert!(
        h.state
            .check_tag(a, 1)
            .expect_err("settled")
            .contains("already settled")
    );
    assert!(h.state.check_tag(99, 1).is_err());
}

#[test]
fn idempotency_keys_are_rebuilt_by_replay() {
    let mut h = Harness::new(config());
    let first = h.publish(PublishCommand {
        message: Some(Message {
            idempotency_key: "k".into(),
            ..Default::default()
        }),
        publish_time_ms: T0,
        ..Default::default()
    });
    assert_eq!(h.state.dedup("k", T0 + 1), Some(first));
    assert_eq!(h.replayed().dedup("k", T0 + 1), Some(first));
    assert_eq!(
        h.replayed().dedup("k", T0 + 60_000),
        None,
        "outside the window"
    );
}

#[test]
fn a_departed_consumer_s_deliveries_become_ready() {
    let mut h = Harness::new(config());
    h.message("a");
    h.message("b");
    let slot = consumer();
    h.deliver(2, &slot, T0);
    assert_eq!(h.state.release_consumer(slot.id), 2);
    assert_eq!(slot.unsettled(), 0);
    assert_eq!(h.state.counters(T0).ready, 2);
}

#[test]
fn a_deep_backlog_costs_no_per_message_memory() {
    let mut h = Harness::new(config());
    for _ in 0..10_000 {
        h.message("x");
    }
    let slot = consumer();
    let got = h.deliver(100, &slot, T0);
    h.settle(SettleKind::Ack, got, 0);
    assert_eq!(h.state.tracked_len(), 0);
    assert_eq!(h.state.counters(T0).ready, 9_900);
}

// ----- packed entries (the leader's outbox, decision 0013) -----

fn encoded(command: &LogCommand) -> bytes::Bytes {
    command.encode_to_vec().into()
}

fn publish_of(payload: &str) -> LogCommand {
    LogCommand {
        command: Some(Command::Publish(PublishCommand {
            message: Some(Message {
                payload: payload.as_bytes().to_vec(),
                ..Default::default()
            }),
            publish_time_ms: T0,
            ..Default::default()
        })),
    }
}

/// Stages `commands` as a leader would and takes the entry; returns the offsets and the entry
/// as a follower's log would hold it.
fn stage_entry(state: &mut PartitionState, commands: &[LogCommand]) -> (Vec<u64>, Entry) {
    let offsets = commands
        .iter()
        .map(|c| state.stage(1, c, encoded(c)))
        .collect();
    let staged = state.take_staged().expect("an entry was staged");
    let entry = Entry {
        index: staged.index,
        term: 1,
        data: crate::queue::entry::encode(staged.commands),
    };
    (offsets, entry)
}

#[test]
fn a_packed_entry_gives_each_command_its_own_offset_and_a_follower_the_same_state() {
    let mut leader = PartitionState::new(config(), 1);
    let (offsets, entry) = stage_entry(
        &mut leader,
        &[publish_of("a"), publish_of("b"), publish_of("c")],
    );
    assert_eq!(entry.index, 1);
    assert_eq!(
        offsets,
        (0..3)
            .map(|s| crate::queue::entry::offset(1, s))
            .collect::<Vec<_>>()
    );
    let mut follower = PartitionState::new(config(), 1);
    follower.apply_entry(&entry).expect("valid batch");
    assert_eq!(follower.counters(T0), leader.counters(T0));
    assert_eq!(
        (follower.next_entry(), follower.next_offset()),
        (leader.next_entry(), leader.next_offset())
    );
    // The follower's cursor reads the three messages out of the one entry, in order.
    let (level, from) = follower.fill_request(1).expect("unseen messages");
    assert_eq!(from, 1);
    follower.fill(level, &[entry], T0).expect("valid batch");
    let picks = follower.take(10, T0);
    assert_eq!(
        picks.iter().map(|p| p.message.offset).collect::<Vec<_>>(),
        offsets
    );
}

#[test]
fn the_low_water_mark_steps_over_a_settled_entry_only_once_it_is_complete() {
    let mut state = PartitionState::new(config(), 1);
    let a = state.stage(1, &publish_of("a"), encoded(&publish_of("a")));
    let b = state.stage(1, &publish_of("b"), encoded(&publish_of("b")));
    // Deliver and ack both inside the still open entry 1.
    let refs: Vec<MessageRef> = [a, b]
        .iter()
        .map(|&offset| MessageRef {
            offset,
            attempt: 1,
            priority: 0,
            size: 1,
            expires_at_ms: 0,
            moves: 0,
        })
        .collect();
    let deliver = LogCommand {
        command: Some(Command::Deliver(DeliverCommand {
            time_ms: T0,
            messages: refs.clone(),
        })),
    };
    state.stage(1, &deliver, encoded(&deliver));
    let ack = LogCommand {
        command: Some(Command::Settle(SettleCommand {
            time_ms: T0,
            kind: SettleKind::Ack as i32,
            messages: refs,
            ..Default::default()
        })),
    };
    let ack_offset = state.stage(1, &ack, encoded(&ack));
    assert_eq!(state.counters(T0).unsettled, 0);
    // Entry 1 is open: more commands may still take positions in it.
    assert_eq!(state.low_water(), ack_offset + 1);
    assert_eq!(state.purge_point(), 1);
    let staged = state.take_staged().expect("entry 1");
    assert_eq!((staged.index, staged.commands.len()), (1, 4));
    assert_eq!(state.low_water(), crate::queue::entry::offset(2, 0));
    assert_eq!(state.purge_point(), 2);
    // The next command opens entry 2.
    let c = state.stage(1, &publish_of("c"), encoded(&publish_of("c")));
    assert_eq!(c, crate::queue::entry::offset(2, 0));
    assert_eq!(state.low_water(), c);
}

#[test]
fn a_replayed_log_of_packed_and_single_entries_rebuilds_the_low_water_mark() {
    let mut leader = PartitionState::new(config(), 1);
    let (first, e1) = stage_entry(&mut leader, &[publish_of("a"), publish_of("b")]);
    let ack = LogCommand {
        command: Some(Command::Settle(SettleCommand {
            time_ms: T0,
            kind: SettleKind::Ack as i32,
            messages: first
                .iter()
                .map(|&offset| MessageRef {
                    offset,
                    size: 1,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })),
    };
    let (_, e2) = stage_entry(&mut leader, &[ack]);
    let (third, e3) = stage_entry(&mut leader, &[publish_of("c"), publish_of("d")]);
    let mut replayed = PartitionState::new(config(), 1);
    for entry in [&e1, &e2, &e3] {
        replayed.apply_entry(entry).expect("valid");
    }
    assert_eq!(replayed.low_water(), third[0]);
    assert_eq!(replayed.low_water(), leader.low_water());
    assert_eq!(replayed.purge_point(), 3);
    assert_eq!(replayed.counters(T0).unsettled, 2);
}

#[test]
fn indices_reserved_for_a_membership_change_are_empty_entries_to_leader_and_follower_alike() {
    let mut leader = PartitionState::new(config(), 1);
    let (first, e1) = stage_entry(&mut leader, &[publish_of("a")]);
    // The reservation comes after every staged entry; the next command opens the entry after it.
    let reserved = leader.reserve_entries(2);
    assert_eq!(reserved, 2..=3);
    let after = leader.stage(1, &publish_of("b"), encoded(&publish_of("b")));
    assert_eq!(after, crate::queue::entry::offset(4, 0));
    let e4 = Entry {
        index: 4,
        term: 1,
        data: crate::queue::entry::encode(leader.take_staged().expect("entry 4").commands),
    };
    // A follower applies entry 2 as the change's membership entry and entry 3 as the empty
    // entry the proposer filled an unused index with: the same state as the leader's.
    let mut follower = PartitionState::new(config(), 1);
    follower.apply_entry(&e1).expect("valid");
    follower.apply_commands(2, &[]);
    let filler = Entry {
        index: 3,
        term: 1,
        data: crate::queue::entry::encode(Vec::new()),
    };
    follower
        .apply_entry(&filler)
        .expect("an empty entry decodes");
    follower.apply_entry(&e4).expect("valid");
    assert_eq!(follower.counters(T0), leader.counters(T0));
    assert_eq!(
        (follower.next_entry(), follower.low_water()),
        (leader.next_entry(), leader.low_water())
    );
    assert_eq!(leader.low_water(), first[0]);
    assert_eq!(leader.next_entry(), 5);
}

/// The state a new leader serves from `h`'s log at `now` (decision 0018).
fn led_after_a_move(h: &Harness, now: u64) -> PartitionState {
    let mut state = PartitionState::new(h.state.config(), 1);
    for entry in &h.log {
        state.apply_entry(entry).expect("valid commands");
    }
    state.finish_replay(true, now);
    state
}

#[test]
fn a_move_keeps_a_delivery_in_flight_for_its_consumer_until_its_own_deadline() {
    let mut h = Harness::new(StateConfig {
        max_deliveries: 1,
        has_dead_letter_queue: true,
        ..config()
    });
    h.message("a");
    let held = h.deliver(1, &consumer(), T0);
    let mut led = led_after_a_move(&h, T0 + 10);
    // The consumer's tag is still good at the new leader.
    let tag = led
        .check_tag(held[0].offset, 1)
        .expect("the tag stays valid");
    assert_eq!(tag.attempt, 1);
    assert_eq!(led.counters(T0 + 10).in_flight, 1);
    assert!(led.take_disposals().is_empty(), "a move burns no attempt");
    // Not settled by the consumer's own deadline: ready again, and not dead-lettered even
    // though max_deliveries is 1.
    assert_eq!(led.expire_deadlines(T0 + 1_000), 1);
    assert!(led.take_disposals().is_empty());
    let counters = led.counters(T0 + 1_000);
    assert_eq!((counters.ready, counters.in_flight), (1, 0));
}

#[test]
fn only_the_attempts_a_consumer_had_count_against_max_deliveries() {
    let mut h = Harness::new(StateConfig {
        max_deliveries: 1,
        has_dead_letter_queue: true,
        ..config()
    });
    h.message("a");
    h.deliver(1, &consumer(), T0);
    // The move comes after the consumer's deadline: ready at once, one free attempt.
    let mut led = led_after_a_move(&h, T0 + 5_000);
    assert!(led.take_disposals().is_empty());
    let slot = consumer();
    let picks = led.take(1, T0 + 5_000);
    assert_eq!(picks.len(), 1);
    let second = picks[0].message;
    assert_eq!(
        (second.attempt, second.moves),
        (2, 1),
        "the deliver records the move"
    );
    let deliver = LogCommand {
        command: Some(Command::Deliver(DeliverCommand {
            time_ms: T0 + 5_000,
            messages: vec![second],
        })),
    };
    led.apply_commands(h.log.len() as u64 + 1, std::slice::from_ref(&deliver));
    led.hand_over(&picks, &slot, T0 + 5_000);
    // This attempt was the consumer's own: its timeout uses up max_deliveries.
    led.expire_deadlines(T0 + 6_000);
    let disposals = led.take_disposals();
    assert_eq!(disposals.len(), 1);
    assert_eq!(disposals[0].disposal, Disposal::MaxDeliveries);
}

#[test]
fn a_restarted_single_agent_counts_interrupted_deliveries_as_before() {
    let mut h = Harness::new(StateConfig {
        max_deliveries: 1,
        has_dead_letter_queue: true,
        ..config()
    });
    h.message("a");
    h.deliver(1, &consumer(), T0);
    let mut restarted = h.replayed();
    assert_eq!(restarted.take_disposals().len(), 1);
}
