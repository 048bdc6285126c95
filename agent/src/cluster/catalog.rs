//! The cluster catalog: which queues exist (with their settings) and where each agent serves
//! clients. It is the state of the meta group, a pure function of its committed log.

use std::collections::BTreeMap;

use sluice_proto::peer::v1 as pb;
use sluice_proto::v1::QueueSpec;

/// What every agent agrees on about the cluster, as of some committed meta-log position.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    /// Declared queues by name, with every default filled in.
    pub queues: BTreeMap<String, QueueSpec>,
    /// Registered agents: node id to client address (`host:port`).
    pub nodes: BTreeMap<u64, String>,
}

impl Catalog {
    /// Applies one committed command. Deterministic, and total: every replica reaches the same
    /// catalog from the same log. A declare of an existing queue with other settings is a no-op
    /// (the first declare wins); the proposer detects that after the commit and reports the
    /// conflict, so a race of two different declares cannot leave replicas disagreeing.
    pub fn apply(&mut self, command: &pb::MetaCommand) {
        use pb::meta_command::Command;
        match &command.command {
            Some(Command::DeclareQueue(pb::DeclareQueue { spec: Some(spec) })) => {
                self.queues
                    .entry(spec.name.clone())
                    .or_insert_with(|| spec.clone());
            }
            Some(Command::DeleteQueue(d)) => {
                self.queues.remove(&d.name);
            }
            Some(Command::RegisterNode(r)) => {
                self.nodes.insert(r.node_id, r.client_address.clone());
            }
            // Proposals are validated first; an empty one changes nothing.
            Some(Command::DeclareQueue(pb::DeclareQueue { spec: None })) | None => {}
        }
    }

    /// The catalog as a snapshot message.
    pub fn to_pb(&self) -> pb::CatalogSnapshot {
        pb::CatalogSnapshot {
            queues: self.queues.values().cloned().collect(),
            nodes: self
                .nodes
                .iter()
                .map(|(node_id, client_address)| pb::RegisterNode {
                    node_id: *node_id,
                    client_address: client_address.clone(),
                })
                .collect(),
        }
    }

    /// The catalog a snapshot message holds.
    pub fn from_pb(snapshot: pb::CatalogSnapshot) -> Self {
        Self {
            queues: snapshot
                .queues
                .into_iter()
                .map(|q| (q.name.clone(), q))
                .collect(),
            nodes: snapshot
                .nodes
                .into_iter()
                .map(|n| (n.node_id, n.client_address))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use pb::meta_command::Command;

    use super::*;

    fn declare(name: &str, partitions: u32) -> pb::MetaCommand {
        pb::MetaCommand {
            command: Some(Command::DeclareQueue(pb::DeclareQueue {
                spec: Some(QueueSpec {
                    name: name.into(),
                    partitions,
                    ..Default::default()
                }),
            })),
        }
    }

    #[test]
    fn the_first_declare_of_a_queue_wins_and_delete_removes_it() {
        let mut c = Catalog::default();
        c.apply(&declare("orders", 3));
        c.apply(&declare("orders", 5));
        assert_eq!(c.queues["orders"].partitions, 3);
        c.apply(&pb::MetaCommand {
            command: Some(Command::DeleteQueue(pb::DeleteQueue {
                name: "orders".into(),
            })),
        });
        assert!(c.queues.is_empty());
        c.apply(&declare("orders", 5));
        assert_eq!(c.queues["orders"].partitions, 5);
    }

    #[test]
    fn registering_a_node_again_updates_its_address() {
        let mut c = Catalog::default();
        for address in ["a:1", "b:2"] {
            c.apply(&pb::MetaCommand {
                command: Some(Command::RegisterNode(pb::RegisterNode {
                    node_id: 4,
                    client_address: address.into(),
                })),
            });
        }
        assert_eq!(c.nodes, BTreeMap::from([(4, "b:2".to_string())]));
    }

    #[test]
    fn a_catalog_survives_its_snapshot_encoding() {
        let mut c = Catalog::default();
        c.apply(&declare("a", 1));
        c.apply(&declare("b", 2));
        c.nodes.insert(0, "x:1".into());
        c.nodes.insert(2, "y:1".into());
        assert_eq!(Catalog::from_pb(c.to_pb()), c);
    }

    #[test]
    fn empty_commands_change_nothing() {
        let mut c = Catalog::default();
        c.apply(&pb::MetaCommand { command: None });
        c.apply(&pb::MetaCommand {
            command: Some(Command::DeclareQueue(pb::DeclareQueue { spec: None })),
        });
        assert_eq!(c, Catalog::default());
    }
}
