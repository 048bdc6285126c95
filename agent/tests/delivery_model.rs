//! Model-based property test of delivery semantics: random publish / consume / ack / nack /
//! nack-with-delay / reject / time-advance / restart sequences run against a real `Broker`
//! (on `FileLog`, and on in-memory logs that survive "restarts" by replay) and a simple model.
//!
//! Checked throughout: no acked message is delivered again (also after restart), first
//! deliveries are FIFO per partition, TTL and delays are respected, tags of current deliveries
//! settle. Checked at the end, after draining: every published message was acked by us or is
//! in the dead-letter queue with the right reason, and max-deliveries copies were delivered
//! exactly `max_deliveries` times.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use sluice_agent::broker::{
    Broker, BrokerConfig, BrokerOptions, FileLogOpener, LogOpener, Subscription,
};
use sluice_agent::config::{FsyncPolicy, LogConfig};
use sluice_agent::log::{LogError, LogStore, MemLog};
use sluice_agent::queue::clock::ManualClock;
use sluice_proto::v1::{Delivery, DeliveryTag, Message, QueueSpec, Settle, SettleAction};

const T0: u64 = 1_700_000_000_000;
const ACK_TIMEOUT_MS: u64 = 1_000;
const MAX_DELIVERIES: u32 = 3;
/// Small, so one take does not grab the whole backlog.
const PREFETCH: u32 = 4;

#[derive(Debug, Clone)]
enum Op {
    Publish {
        n: usize,
        delay_ms: u64,
        ttl_ms: u64,
        key: Option<u8>,
    },
    /// Take every delivery the subscription can get now (its prefetch is small).
    Consume,
    Ack(usize),
    Nack(usize),
    NackDelay(usize),
    Reject(usize),
    Advance(u64),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..4usize, prop_oneof![3 => Just(0u64), 1 => Just(1_500u64)], prop_oneof![3 => Just(0u64), 1 => Just(2_500u64)], proptest::option::of(0..3u8))
            .prop_map(|(n, delay_ms, ttl_ms, key)| Op::Publish { n, delay_ms, ttl_ms, key }),
        4 => Just(Op::Consume),
        3 => any::<usize>().prop_map(Op::Ack),
        2 => any::<usize>().prop_map(Op::Nack),
        1 => any::<usize>().prop_map(Op::NackDelay),
        1 => any::<usize>().prop_map(Op::Reject),
        2 => prop_oneof![Just(300u64), Just(1_000u64), Just(3_000u64)].prop_map(Op::Advance),
        1 => Just(Op::Restart),
    ]
}

/// In-memory logs that outlive a broker: reopening a directory returns the same log, and the
/// broker rebuilds its state by replay.
#[derive(Default)]
struct MemLogs(Mutex<HashMap<std::path::PathBuf, Arc<MemLog>>>);

impl LogOpener for MemLogs {
    fn open(&self, dir: &Path) -> Result<Arc<dyn LogStore>, LogError> {
        let mut logs = self.0.lock().expect("lock");
        Ok(logs
            .entry(dir.to_path_buf())
            .or_insert_with(|| Arc::new(MemLog::new()))
            .clone())
    }
}

/// What the model knows about one published message (by payload).
#[derive(Debug, Default)]
struct Expect {
    partition: u32,
    offset: u64,
    publish_ms: u64,
    delay_ms: u64,
    ttl_ms: u64,
    deliveries: u32,
    acked: bool,
}

struct Run {
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    logs: Arc<dyn LogOpener>,
    /// `None` only while restarting.
    broker: Option<Arc<Broker>>,
    /// `None` only while restarting.
    sub: Option<Subscription>,
    messages: BTreeMap<String, Expect>,
    /// Deliveries we hold: payload, tag, deadline.
    held: Vec<(String, DeliveryTag, u64)>,
    /// Highest first-delivered offset per partition among undelayed messages (FIFO check).
    fifo: HashMap<u32, u64>,
    next_payload: usize,
}

async fn open(dir: &Path, clock: &Arc<ManualClock>, logs: &Arc<dyn LogOpener>) -> Arc<Broker> {
    let config = BrokerConfig {
        data_dir: dir.to_path_buf(),
        log: LogConfig {
            segment_bytes: 16 * 1024,
            fsync: FsyncPolicy::Never,
        },
    };
    let options = BrokerOptions {
        clock: clock.clone(),
        logs: logs.clone(),
        timers: false,
        cluster: None,
    };
    Broker::open_with(config, options)
        .await
        .expect("open broker")
}

impl Run {
    async fn start(file: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(T0));
        let logs: Arc<dyn LogOpener> = if file {
            Arc::new(FileLogOpener {
                config: LogConfig {
                    segment_bytes: 16 * 1024,
                    fsync: FsyncPolicy::Never,
                },
            })
        } else {
            Arc::new(MemLogs::default())
        };
        let broker = open(dir.path(), &clock, &logs).await;
        let spec = QueueSpec {
            name: "work".into(),
            partitions: 2,
            ack_timeout_ms: ACK_TIMEOUT_MS,
            max_deliveries: MAX_DELIVERIES,
            dead_letter_queue: "dlq".into(),
            ..QueueSpec::default()
        };
        broker.declare(spec).await.expect("declare");
        let sub = broker
            .subscribe("work", PREFETCH, "model")
            .await
            .expect("subscribe");
        Self {
            dir,
            clock,
            logs,
            broker: Some(broker),
            sub: Some(sub),
            messages: BTreeMap::new(),
            held: Vec::new(),
            fifo: HashMap::new(),
            next_payload: 0,
        }
    }

    fn now(&self) -> u64 {
        use sluice_agent::queue::clock::Clock;
        self.clock.now_ms()
    }

    fn check_delivery(&mut self, d: &Delivery) -> String {
        let payload =
            String::from_utf8_lossy(&d.message.as_ref().expect("message").payload).into_owned();
        let now = self.now();
        let m = self
            .messages
            .get_mut(&payload)
            .expect("a delivered message was published");
        assert!(!m.acked, "acked message {payload} delivered again");
        let id = d.id.expect("id");
        assert_eq!((id.partition, id.offset), (m.partition, m.offset));
        assert!(
            now >= m.publish_ms + m.delay_ms,
            "{payload} delivered before its delay"
        );
        assert!(
            m.ttl_ms == 0 || now < m.publish_ms + m.ttl_ms,
            "{payload} delivered after its TTL"
        );
        m.deliveries += 1;
        assert_eq!(
            d.attempt, m.deliveries,
            "{payload}: attempt numbers count deliveries"
        );
        assert!(
            m.deliveries <= MAX_DELIVERIES,
            "{payload} delivered more than max_deliveries"
        );
        if d.attempt == 1 && m.delay_ms == 0 {
            let last = self.fifo.entry(id.partition).or_insert(0);
            assert!(
                id.offset > *last,
                "first deliveries out of order in partition {}",
                id.partition
            );
            *last = id.offset;
        }
        payload
    }

    async fn apply(&mut self, op: &Op) {
        match op {
            Op::Publish {
                n,
                delay_ms,
                ttl_ms,
                key,
            } => {
                let mut batch = Vec::new();
                let mut names = Vec::new();
                for _ in 0..*n {
                    let payload = format!("m{:04}", self.next_payload);
                    self.next_payload += 1;
                    let ordering_key = key.map(|k| format!("key-{k}")).unwrap_or_default();
                    batch.push(Message {
                        payload: payload.clone().into_bytes(),
                        ordering_key,
                        delay_ms: *delay_ms,
                        ttl_ms: *ttl_ms,
                        ..Message::default()
                    });
                    names.push(payload);
                }
                let confirms = self
                    .broker()
                    .publish("work", batch)
                    .await
                    .map(sluice_agent::grpc::status::confirms)
                    .expect("publish");
                let now = self.now();
                for (name, confirm) in names.into_iter().zip(confirms) {
                    assert_eq!(confirm.code, 0, "{}", confirm.error);
                    let id = confirm.id.expect("id");
                    self.messages.insert(
                        name,
                        Expect {
                            partition: id.partition,
                            offset: id.offset,
                            publish_ms: now,
                            delay_ms: *delay_ms,
                            ttl_ms: *ttl_ms,
                            ..Expect::default()
                        },
                    );
                }
            }
            Op::Consume => {
                // Drain what the subscription took: a delivery left in its buffer past its
                // deadline would be skipped, and the model counts every attempt.
                while let Some(d) = self.sub().try_next().expect("take") {
                    let payload = self.check_delivery(&d);
                    self.held
                        .push((payload, d.tag.expect("tag"), self.now() + ACK_TIMEOUT_MS));
                }
            }
            Op::Ack(i) | Op::Nack(i) | Op::NackDelay(i) | Op::Reject(i) => {
                if self.held.is_empty() {
                    return;
                }
                let (payload, tag, _) = self.held.remove(i % self.held.len());
                let (action, delay_ms) = match op {
                    Op::Ack(_) => (SettleAction::Ack, 0),
                    Op::Nack(_) => (SettleAction::Nack, 0),
                    Op::NackDelay(_) => (SettleAction::Nack, 500),
                    _ => (SettleAction::Reject, 0),
                };
                let failures = self
                    .sub()
                    .settle(Settle {
                        action: action as i32,
                        tags: vec![tag],
                        delay_ms,
                    })
                    .await
                    .expect("settle");
                assert!(failures.is_empty(), "current tag refused: {failures:?}");
                if action == SettleAction::Ack {
                    self.messages.get_mut(&payload).expect("known").acked = true;
                }
                // Acking the same tag again is refused and changes nothing.
                let again = self
                    .sub()
                    .settle(Settle {
                        action: SettleAction::Ack as i32,
                        tags: vec![tag],
                        delay_ms: 0,
                    })
                    .await;
                assert_eq!(
                    again.expect("settle").len(),
                    1,
                    "a settled tag must be refused"
                );
            }
            Op::Advance(ms) => {
                self.clock.advance(*ms);
                self.broker().tick().await;
                let now = self.now();
                // Deliveries past their deadline are no longer ours.
                self.held.retain(|(_, _, deadline)| *deadline > now);
            }
            Op::Restart => self.restart().await,
        }
    }

    fn broker(&self) -> &Arc<Broker> {
        self.broker.as_ref().expect("open")
    }

    fn sub(&mut self) -> &mut Subscription {
        self.sub.as_mut().expect("subscribed")
    }

    async fn restart(&mut self) {
        self.broker().shutdown().await;
        // The subscription holds the broker (and its directory lock): drop both first.
        self.sub = None;
        self.broker = None;
        self.held.clear();
        self.broker = Some(open(self.dir.path(), &self.clock, &self.logs).await);
        self.sub = Some(
            self.broker()
                .subscribe("work", PREFETCH, "model")
                .await
                .expect("subscribe"),
        );
    }

    /// Drains everything and checks that no message was lost.
    async fn finish(mut self) {
        for _ in 0..500 {
            self.clock.advance(5_000);
            self.broker().tick().await;
            self.held.clear();
            let mut tags = Vec::new();
            while let Some(d) = self.sub().try_next().expect("take") {
                let payload = self.check_delivery(&d);
                self.messages.get_mut(&payload).expect("known").acked = true;
                tags.push(d.tag.expect("tag"));
            }
            if tags.is_empty() {
                break;
            }
            let failures = self
                .sub()
                .settle(Settle {
                    action: SettleAction::Ack as i32,
                    tags,
                    delay_ms: 0,
                })
                .await
                .expect("ack");
            assert!(failures.is_empty());
        }
        self.broker().tick().await;
        let mut dlq = self
            .broker()
            .subscribe("dlq", 10_000, "dlq")
            .await
            .expect("subscribe dlq");
        let mut dead: HashMap<String, String> = HashMap::new();
        while let Some(d) = dlq.try_next().expect("take dlq") {
            let payload =
                String::from_utf8_lossy(&d.message.as_ref().expect("message").payload).into_owned();
            assert_eq!(d.dead_letter_source, "work");
            dead.insert(payload, d.dead_letter_reason.clone());
        }
        for (payload, m) in &self.messages {
            match dead.get(payload) {
                Some(reason) => {
                    assert!(!m.acked, "{payload} was acked and dead-lettered");
                    match reason.as_str() {
                        "max-deliveries" => assert_eq!(m.deliveries, MAX_DELIVERIES, "{payload}"),
                        "expired" => assert!(m.ttl_ms > 0, "{payload} expired without a TTL"),
                        "rejected" => {}
                        other => panic!("unknown reason {other}"),
                    }
                }
                None => assert!(
                    m.acked,
                    "{payload} was lost: neither acked nor dead-lettered ({m:?})"
                ),
            }
        }
    }
}

fn run(file: bool, ops: Vec<Op>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut run = Run::start(file).await;
        for op in &ops {
            run.apply(op).await;
        }
        run.finish().await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn delivery_semantics_hold_on_replayed_memory_logs(ops in proptest::collection::vec(op(), 1..60)) {
        run(false, ops);
    }

    #[test]
    fn delivery_semantics_hold_on_file_logs_across_restarts(ops in proptest::collection::vec(op(), 1..40)) {
        run(true, ops);
    }
}
