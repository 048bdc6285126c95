//! The meta group's state machine: applies committed `MetaCommand`s to the [`Catalog`] and
//! publishes every new catalog on a watch channel.
//!
//! It starts empty on every start and reports nothing applied, so openraft re-applies the whole
//! committed meta log (which is never purged, decision 0009) as soon as this replica learns the
//! commit index from a leader, or commits its own term as leader. The catalog is small (queue
//! specs and agent addresses), so snapshots are the encoded catalog, held in memory.

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use prost::Message;
use sluice_proto::peer::v1 as pb;
use tokio::sync::{Mutex, watch};

use super::catalog::Catalog;
use crate::replication::codec::{self, RaftEntry};
use crate::replication::types::{Applied, NodeId, TypeConfig};

/// What the state machine holds; one lock, since openraft applies from one task.
struct Inner {
    /// The catalog as of `last_applied`.
    catalog: Catalog,
    /// Last applied entry; `None` on start, so openraft replays the committed log.
    last_applied: Option<LogId<NodeId>>,
    /// Membership as of `last_applied`.
    membership: StoredMembership<NodeId, BasicNode>,
    /// The latest snapshot built or installed.
    snapshot: Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>,
}

/// The meta group's state machine. Clones share the state.
#[derive(Clone)]
pub struct CatalogStateMachine {
    inner: Arc<Mutex<Inner>>,
    /// Publishes the catalog after each applied batch.
    published: Arc<watch::Sender<Arc<Catalog>>>,
    /// Makes snapshot ids unique within this process.
    snapshots_built: Arc<AtomicU64>,
}

impl Default for CatalogStateMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl CatalogStateMachine {
    /// An empty state machine with nothing applied.
    pub fn new() -> Self {
        let (published, _) = watch::channel(Arc::new(Catalog::default()));
        Self {
            inner: Arc::new(Mutex::new(Inner {
                catalog: Catalog::default(),
                last_applied: None,
                membership: StoredMembership::default(),
                snapshot: None,
            })),
            published: Arc::new(published),
            snapshots_built: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A receiver of the catalog, updated after every applied batch of entries.
    pub fn catalog(&self) -> watch::Receiver<Arc<Catalog>> {
        self.published.subscribe()
    }

    /// The catalog as of the last applied entry.
    pub fn current(&self) -> Arc<Catalog> {
        self.published.borrow().clone()
    }

    fn publish(&self, catalog: &Catalog) {
        // send_replace: publish even while nobody subscribes, so later subscribers see it.
        self.published.send_replace(Arc::new(catalog.clone()));
    }
}

/// A committed meta entry whose data is not a `MetaCommand`.
#[derive(Debug, thiserror::Error)]
#[error("meta log entry at raft index {index} is not a MetaCommand: {source}")]
pub struct BadEntry {
    /// The entry's Raft index.
    pub index: u64,
    /// The decoder's error.
    #[source]
    pub source: prost::DecodeError,
}

/// A snapshot received from the leader that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("catalog snapshot {id} does not decode: {source}")]
pub struct BadSnapshot {
    /// The snapshot id.
    pub id: String,
    /// The decoder's error.
    #[source]
    pub source: prost::DecodeError,
}

impl RaftSnapshotBuilder<TypeConfig> for CatalogStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let mut inner = self.inner.lock().await;
        let data = inner.catalog.to_pb().encode_to_vec();
        let last = inner.last_applied;
        let seq = self.snapshots_built.fetch_add(1, Ordering::Relaxed);
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: inner.membership.clone(),
            snapshot_id: format!(
                "meta-{}-{}-{seq}",
                last.map_or(0, |l| l.leader_id.term),
                last.map_or(0, |l| l.index)
            ),
        };
        inner.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for CatalogStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        let inner = self.inner.lock().await;
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = RaftEntry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.inner.lock().await;
        let mut out = Vec::new();
        for entry in entries {
            match &entry.payload {
                EntryPayload::Normal(data) => {
                    // Proposals are encoded by this crate after validation, so an entry that
                    // does not decode is damage: stop rather than let replicas diverge.
                    let command = pb::MetaCommand::decode(data.as_ref()).map_err(|source| {
                        let e = BadEntry {
                            index: entry.log_id.index,
                            source,
                        };
                        StorageIOError::apply(entry.log_id, &e)
                    })?;
                    inner.catalog.apply(&command);
                }
                EntryPayload::Blank => {}
                EntryPayload::Membership(m) => {
                    inner.catalog.apply_membership(m);
                    inner.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                }
            }
            inner.last_applied = Some(entry.log_id);
            out.push(Applied {
                index: codec::log_index(entry.log_id.index),
            });
        }
        self.publish(&inner.catalog);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let decoded = pb::CatalogSnapshot::decode(data.as_slice()).map_err(|source| {
            let e = BadSnapshot {
                id: meta.snapshot_id.clone(),
                source,
            };
            StorageIOError::read_snapshot(Some(meta.signature()), &e)
        })?;
        let mut inner = self.inner.lock().await;
        inner.catalog = Catalog::from_pb(decoded);
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some((meta.clone(), data));
        self.publish(&inner.catalog);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.inner.lock().await;
        Ok(inner.snapshot.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(data.clone())),
        }))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use openraft::Entry;
    use pb::meta_command::Command;
    use sluice_proto::v1::QueueSpec;

    use super::*;

    fn normal(index: u64, command: &pb::MetaCommand) -> RaftEntry {
        Entry {
            log_id: codec::log_id(1, index),
            payload: EntryPayload::Normal(Bytes::from(command.encode_to_vec())),
        }
    }

    fn declare(name: &str) -> pb::MetaCommand {
        pb::MetaCommand {
            command: Some(Command::DeclareQueue(pb::DeclareQueue {
                spec: Some(QueueSpec {
                    name: name.into(),
                    partitions: 2,
                    ..Default::default()
                }),
            })),
        }
    }

    #[tokio::test]
    async fn applied_commands_are_published_on_the_catalog_watch() {
        let mut sm = CatalogStateMachine::new();
        let mut rx = sm.catalog();
        let applied = sm
            .apply([
                Entry {
                    log_id: codec::log_id(1, 1),
                    payload: EntryPayload::Blank,
                },
                normal(2, &declare("orders")),
            ])
            .await
            .expect("apply");
        assert_eq!(applied, vec![Applied { index: 2 }, Applied { index: 3 }]);
        assert!(rx.has_changed().expect("sender alive"));
        assert!(rx.borrow_and_update().queues.contains_key("orders"));
        let (last, _) = sm.applied_state().await.expect("state");
        assert_eq!(last, Some(codec::log_id(1, 2)));
    }

    #[tokio::test]
    async fn a_snapshot_installed_elsewhere_reproduces_the_catalog() {
        let mut sm = CatalogStateMachine::new();
        sm.apply([normal(1, &declare("a")), normal(2, &declare("b"))])
            .await
            .expect("apply");
        let snapshot = sm.build_snapshot().await.expect("build");
        let mut other = CatalogStateMachine::new();
        other
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .expect("install");
        assert_eq!(*other.current(), *sm.current());
        let (last, _) = other.applied_state().await.expect("state");
        assert_eq!(last, Some(codec::log_id(1, 2)));
        assert!(other.get_current_snapshot().await.expect("get").is_some());
    }

    #[tokio::test]
    async fn an_entry_that_is_not_a_meta_command_stops_the_state_machine() {
        let mut sm = CatalogStateMachine::new();
        let bad = Entry {
            log_id: codec::log_id(1, 7),
            payload: EntryPayload::Normal(Bytes::from_static(&[0xff, 0xff, 0xff])),
        };
        let e = sm.apply([bad]).await.expect_err("refused");
        assert!(e.to_string().contains("raft index 7"), "{e}");
        assert_eq!(*sm.current(), Catalog::default());
    }

    #[tokio::test]
    async fn a_snapshot_that_does_not_decode_is_refused() {
        let mut sm = CatalogStateMachine::new();
        let meta = SnapshotMeta {
            last_log_id: Some(codec::log_id(1, 3)),
            last_membership: StoredMembership::default(),
            snapshot_id: "s-1".into(),
        };
        let e = sm
            .install_snapshot(&meta, Box::new(Cursor::new(vec![0xff, 0xff])))
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("s-1"), "{e}");
    }
}
