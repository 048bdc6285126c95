//! The client load of the end-to-end test and its ledger: publishers confirm keyed messages
//! (idempotency key = message key, so a resend after an error cannot enqueue twice), a
//! consumer checks and acks them and counts an ack only once the agents report it durable.
//! The guarantees: every confirmed key is delivered, no key comes back after its ack was
//! durable, every payload is what was published.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_client::Client;
use sluice_client::proto::{DeliveryTag, Message};

/// Keys published per request.
const BATCH: usize = 10;
/// Pause between batches: a steady, moderate load that leaves the 2-core machine to the agents.
const PUBLISH_PAUSE: Duration = Duration::from_millis(25);
/// Longest a publish may go unanswered before it is given up and resent (the same keys).
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// Acks sent between two flushes.
const FLUSH_EVERY: usize = 20;
/// A subscription that brings nothing for this long is flushed (and, if the stream ended,
/// reopened).
const IDLE: Duration = Duration::from_millis(500);

/// The payload of `key`.
pub fn payload(key: &str) -> Vec<u8> {
    format!("{key}|{}", key.bytes().map(u32::from).sum::<u32>()).into_bytes()
}

fn check(bytes: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let key = text.split('|').next().unwrap_or_default();
    if payload(key) == bytes {
        Ok(key.to_owned())
    } else {
        Err(format!("payload {text:?} is not what was published"))
    }
}

#[derive(Default)]
struct Book {
    confirmed: BTreeSet<String>,
    delivered: BTreeMap<String, u32>,
    acked: BTreeSet<String>,
    resurrected: Vec<String>,
    corrupted: Vec<String>,
    /// Publishers still running: a batch in flight when `stop` is set may still be confirmed,
    /// so the consumer drains only once they have all returned.
    publishing: usize,
}

/// What was confirmed, delivered and acked.
#[derive(Default, Clone)]
pub struct Ledger(Arc<Mutex<Book>>);

/// Totals and violations of a ledger.
#[derive(Debug)]
pub struct Summary {
    /// Keys confirmed.
    pub confirmed: usize,
    /// Distinct keys delivered.
    pub consumed: usize,
    /// Deliveries beyond the first of a key.
    pub redeliveries: u32,
    /// Keys whose ack was durable.
    pub acked: usize,
    /// Confirmed keys never delivered.
    pub missing: Vec<String>,
    /// Keys delivered again after their ack was durable.
    pub resurrected: Vec<String>,
    /// Payloads that differ from what was published.
    pub corrupted: Vec<String>,
}

impl Ledger {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keys confirmed so far.
    pub fn confirmed(&self) -> usize {
        self.book().confirmed.len()
    }

    /// Waits until `more` keys beyond those confirmed now are confirmed; fails the test when
    /// publishing stalls for `within`.
    pub async fn await_confirms(&self, more: usize, within: Duration) {
        let target = self.confirmed() + more;
        let deadline = std::time::Instant::now() + within;
        while self.confirmed() < target {
            assert!(
                std::time::Instant::now() < deadline,
                "publishing stalled at {} confirms",
                self.confirmed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether every publisher has returned and every key it confirmed has been delivered.
    pub fn all_consumed(&self) -> bool {
        let b = self.book();
        b.publishing == 0 && b.confirmed.iter().all(|k| b.delivered.contains_key(k))
    }

    /// The totals.
    pub fn summary(&self) -> Summary {
        let b = self.book();
        Summary {
            confirmed: b.confirmed.len(),
            consumed: b.delivered.len(),
            redeliveries: b.delivered.values().map(|n| n - 1).sum(),
            acked: b.acked.len(),
            missing: b
                .confirmed
                .iter()
                .filter(|k| !b.delivered.contains_key(*k))
                .cloned()
                .collect(),
            resurrected: b.resurrected.clone(),
            corrupted: b.corrupted.clone(),
        }
    }
}

impl Summary {
    /// Asserts the data-plane guarantees.
    pub fn assert_guarantees(&self) {
        assert!(self.confirmed > 0, "nothing was confirmed: {self:?}");
        assert!(
            self.missing.is_empty(),
            "{} confirmed keys never consumed, e.g. {:?}",
            self.missing.len(),
            &self.missing[..self.missing.len().min(10)]
        );
        assert!(
            self.resurrected.is_empty(),
            "acked keys came back: {:?}",
            self.resurrected
        );
        assert!(
            self.corrupted.is_empty(),
            "corrupted payloads: {:?}",
            self.corrupted
        );
    }
}

/// Publishes `<prefix>-<n>` keys to `queue` until `stop`, each batch resent with the same keys
/// until every one is confirmed.
pub async fn publish(
    client: Client,
    queue: String,
    prefix: String,
    ledger: Ledger,
    stop: Arc<AtomicBool>,
) {
    ledger.book().publishing += 1;
    let mut last_error: Option<String> = None;
    let mut next = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut keys: Vec<String> = (0..BATCH)
            .map(|i| format!("{prefix}-{}", next + i as u64))
            .collect();
        next += BATCH as u64;
        // Resend what is not confirmed yet; give up on a batch only when stopping.
        while !keys.is_empty() && !stop.load(Ordering::Relaxed) {
            let messages = keys
                .iter()
                .map(|k| Message {
                    payload: payload(k),
                    idempotency_key: k.clone(),
                    ..Message::default()
                })
                .collect();
            let answer = tokio::time::timeout(ANSWER_WITHIN, client.publish(&queue, messages));
            let outcome = match answer.await {
                Ok(answered) => answered.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {ANSWER_WITHIN:?}")),
            };
            match outcome {
                Ok(confirms) => {
                    last_error = None;
                    let mut left = Vec::new();
                    for (key, confirm) in keys.into_iter().zip(confirms) {
                        if confirm.code == 0 {
                            ledger.book().confirmed.insert(key);
                        } else {
                            left.push(key);
                        }
                    }
                    keys = left;
                }
                Err(e) => {
                    // Said once per kind of failure, so a stall shows its cause.
                    let said = e;
                    if last_error.as_deref() != Some(said.as_str()) {
                        eprintln!("publisher: {said} (resending)");
                        last_error = Some(said);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
            }
        }
        tokio::time::sleep(PUBLISH_PAUSE).await;
    }
    ledger.book().publishing -= 1;
}

/// Consumes `queue` through any of `endpoints`, acking everything, until `stop` is set, the
/// publishers have returned and every key they confirmed was delivered. Reopens the subscription whenever it fails.
pub async fn consume(endpoints: Vec<String>, queue: String, ledger: Ledger, stop: Arc<AtomicBool>) {
    let done = || stop.load(Ordering::Relaxed) && ledger.all_consumed();
    while !done() {
        let Ok(client) = Client::connect_any(&endpoints).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok(mut consumer) = client.subscribe(&queue, 64).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut pending: Vec<(String, DeliveryTag)> = Vec::new();
        loop {
            let next = tokio::time::timeout(IDLE, consumer.next()).await;
            let delivery = match next {
                Ok(Ok(Some(d))) => Some(d),
                Ok(Ok(None) | Err(_)) => break,
                Err(_) => None,
            };
            let idle = delivery.is_none();
            if let Some(d) = delivery {
                let bytes = d
                    .message
                    .as_ref()
                    .map(|m| m.payload.clone())
                    .unwrap_or_default();
                match check(&bytes) {
                    Ok(key) => {
                        let mut b = ledger.book();
                        if b.acked.contains(&key) {
                            b.resurrected.push(format!("{key} (attempt {})", d.attempt));
                        }
                        *b.delivered.entry(key.clone()).or_insert(0) += 1;
                        drop(b);
                        if let Some(tag) = d.tag {
                            if consumer.ack(tag).is_err() {
                                break;
                            }
                            pending.push((key, tag));
                        }
                    }
                    Err(e) => ledger.book().corrupted.push(e),
                }
            }
            if pending.len() >= FLUSH_EVERY || (idle && !pending.is_empty()) {
                // The agent answers every settle or ends the stream with a status (e.g. the
                // queue moved away): then the flush fails and the subscription is reopened.
                match consumer.flush().await {
                    Ok(failed) => {
                        let failed: BTreeSet<(u32, u64)> = failed
                            .iter()
                            .filter_map(|o| o.tag.map(|t| (t.partition, t.offset)))
                            .collect();
                        let mut b = ledger.book();
                        for (key, tag) in pending.drain(..) {
                            if !failed.contains(&(tag.partition, tag.offset)) {
                                b.acked.insert(key);
                            }
                        }
                    }
                    Err(_) => break,
                }
            }
            if done() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
