//! The ledger of a fault test: what was confirmed, delivered and acked, judged against the
//! guarantees (every confirmed key consumed, no acked message back, no payload changed).
//!
//! Every payload carries its key and a CRC32 of it, so a delivery is checked on its own.

#![allow(dead_code)] // Each fault test uses a different part of the ledger.

use std::collections::BTreeMap;
use std::sync::Mutex;

use sluice_proto::v1::{Delivery, MessageId};

/// Bytes of a payload (the benchmark size).
const PAYLOAD_BYTES: usize = 256;

/// The payload of `key`: the key, a CRC32 of it, and filler derived from both.
pub fn payload(key: &str) -> Vec<u8> {
    let crc = crc32fast::hash(key.as_bytes());
    let mut out = format!("{key}|{crc:08x}|").into_bytes();
    let mut x = crc;
    while out.len() < PAYLOAD_BYTES {
        // xorshift: filler that differs per key, so a payload moved to another key is caught.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.push(b'a' + (x % 26) as u8);
    }
    out
}

/// The key a payload claims, if the payload is exactly [`payload`] of it.
pub fn check_payload(bytes: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("payload is not UTF-8: {e}"))?;
    let key = text
        .split('|')
        .next()
        .ok_or_else(|| format!("payload without a key: {text:?}"))?;
    if payload(key) == bytes {
        Ok(key.to_owned())
    } else {
        Err(format!(
            "payload of {key:?} differs from what was published: {text:?}"
        ))
    }
}

/// What happened to the messages of one test.
#[derive(Default)]
pub struct Ledger {
    inner: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    /// Confirmed key -> message id of its (first) confirm.
    confirmed: BTreeMap<String, MessageId>,
    /// Keys confirmed with two different ids (enqueued twice).
    id_conflicts: Vec<String>,
    /// Key -> deliveries seen (attempt numbers).
    delivered: BTreeMap<String, Vec<u32>>,
    /// Key -> attempt whose ack the agent reported durable, and the subscription it was made
    /// durable on.
    acked: BTreeMap<String, (u32, u64)>,
    /// Redeliveries that raced an ack on the same subscription (taken before the ack applied,
    /// e.g. when a leader re-synchronised); legitimate at-least-once duplicates.
    raced: usize,
    /// Key -> where its ack was made durable.
    acked_at: BTreeMap<String, String>,
    /// Deliveries of a key after its ack was durable.
    resurrected: Vec<String>,
    /// Payloads that did not check out.
    corrupted: Vec<String>,
    /// Subscriptions opened so far (numbers them).
    subscriptions: u64,
}

/// Totals of a ledger, printed by every test.
#[derive(Debug)]
pub struct Summary {
    /// Keys confirmed to a publisher.
    pub confirmed: usize,
    /// Distinct keys delivered.
    pub consumed: usize,
    /// Deliveries in total.
    pub deliveries: usize,
    /// Deliveries beyond the first of each key.
    pub redeliveries: usize,
    /// Keys whose ack was durable.
    pub acked: usize,
    /// Confirmed keys never delivered.
    pub missing: Vec<String>,
    /// Acked keys delivered again afterwards: key, attempts and agents.
    pub resurrected: Vec<String>,
    /// Redeliveries on the subscription whose ack of an earlier attempt was still in flight.
    pub raced: usize,
    /// Payloads that differ from what was published.
    pub corrupted: Vec<String>,
    /// Keys confirmed with two different ids.
    pub id_conflicts: Vec<String>,
    /// Delivered keys starting with a given prefix (see [`Ledger::summary`]).
    pub forbidden_delivered: Vec<String>,
}

impl Summary {
    /// Asserts the guarantees every fault test holds.
    pub fn assert_guarantees(&self) {
        assert!(self.confirmed > 0, "nothing was confirmed: {self:?}");
        assert!(
            self.missing.is_empty(),
            "{} confirmed keys were never consumed, e.g. {:?}",
            self.missing.len(),
            &self.missing[..self.missing.len().min(10)]
        );
        assert!(
            self.resurrected.is_empty(),
            "acked messages came back: {:?}",
            &self.resurrected[..self.resurrected.len().min(10)]
        );
        assert!(
            self.corrupted.is_empty(),
            "corrupted payloads: {:?}",
            self.corrupted
        );
        assert!(
            self.id_conflicts.is_empty(),
            "keys enqueued twice: {:?}",
            self.id_conflicts
        );
        assert!(
            self.forbidden_delivered.is_empty(),
            "writes that were never confirmed by a leader of the majority were delivered: {:?}",
            self.forbidden_delivered
        );
    }
}

impl Ledger {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a confirm of `key` as `id`.
    pub fn confirm(&self, key: &str, id: MessageId) {
        let mut book = self.book();
        match book.confirmed.get(key).copied() {
            Some(first) if first != id => book.id_conflicts.push(format!(
                "{key}: {}/{} then {}/{}",
                first.partition, first.offset, id.partition, id.offset
            )),
            Some(_) => {}
            None => {
                book.confirmed.insert(key.to_owned(), id);
            }
        }
    }

    /// Records a delivery made by agent `from` on subscription `sub`, checking its payload and
    /// that its key was not acked before. Returns the key when the payload checks out.
    pub fn deliver(&self, delivery: &Delivery, from: &str, sub: u64) -> Option<String> {
        let bytes = delivery
            .message
            .as_ref()
            .map(|m| m.payload.as_slice())
            .unwrap_or_default();
        let mut book = self.book();
        match check_payload(bytes) {
            Ok(key) => {
                // A durable ack of attempt `a` means attempt `a` was the last one: any later
                // subscription seeing a higher attempt got a message back that was done. On
                // the same subscription a redelivery may have been taken just before the ack
                // applied and still be on its way, so it only counts as a race.
                if let Some(&(acked, acked_sub)) = book.acked.get(&key)
                    && delivery.attempt > acked
                {
                    if sub > acked_sub {
                        let at = book.acked_at.get(&key).cloned().unwrap_or_default();
                        book.resurrected.push(format!(
                            "{key}: attempt {acked} acked at {at}, attempt {} delivered later by {from}",
                            delivery.attempt
                        ));
                    } else {
                        book.raced += 1;
                    }
                }
                book.delivered
                    .entry(key.clone())
                    .or_default()
                    .push(delivery.attempt);
                Some(key)
            }
            Err(reason) => {
                book.corrupted.push(format!("from {from}: {reason}"));
                None
            }
        }
    }

    /// Records that agent `at` made the ack of `key`'s delivery `attempt` durable on
    /// subscription `sub`.
    pub fn ack(&self, key: &str, attempt: u32, at: &str, sub: u64) {
        let mut book = self.book();
        // A higher attempt already delivered raced this ack (see `deliver`).
        if book
            .delivered
            .get(key)
            .is_some_and(|a| a.iter().any(|x| *x > attempt))
        {
            book.raced += 1;
        }
        book.acked.insert(key.to_owned(), (attempt, sub));
        book.acked_at.insert(key.to_owned(), at.to_owned());
    }

    /// A number for a new subscription, larger than every earlier one.
    pub fn next_subscription(&self) -> u64 {
        let mut book = self.book();
        book.subscriptions += 1;
        book.subscriptions
    }

    /// Confirmed keys so far.
    pub fn confirmed(&self) -> usize {
        self.book().confirmed.len()
    }

    /// Distinct keys delivered so far.
    pub fn consumed(&self) -> usize {
        self.book().delivered.len()
    }

    /// Durable acks so far.
    pub fn acked(&self) -> usize {
        self.book().acked.len()
    }

    /// Totals; keys starting with `forbidden` must never be delivered (writes a deposed leader
    /// took while it could not reach a quorum).
    pub fn summary(&self, forbidden: Option<&str>) -> Summary {
        let book = self.book();
        let deliveries: usize = book.delivered.values().map(Vec::len).sum();
        Summary {
            confirmed: book.confirmed.len(),
            consumed: book.delivered.len(),
            deliveries,
            redeliveries: deliveries - book.delivered.len(),
            acked: book.acked.len(),
            missing: book
                .confirmed
                .keys()
                .filter(|k| !book.delivered.contains_key(*k))
                .cloned()
                .collect(),
            resurrected: book.resurrected.clone(),
            raced: book.raced,
            corrupted: book.corrupted.clone(),
            id_conflicts: book.id_conflicts.clone(),
            forbidden_delivered: forbidden
                .map(|p| {
                    book.delivered
                        .keys()
                        .filter(|k| k.starts_with(p))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}
