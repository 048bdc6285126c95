//! Conversions between openraft values, partition-log records and `sluice.peer.v1` messages.
//!
//! One encoding serves both the disk and the wire: an entry travels as the exact bytes a
//! replica stores, so a follower writes what the leader wrote.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use openraft::{
    BasicNode, CommittedLeaderId, EntryPayload, LogId, Membership, StoredMembership, Vote,
};
use prost::Message;
use sluice_proto::peer::v1 as pb;

use super::types::{NodeId, TypeConfig};

/// An openraft entry of this crate's type configuration.
pub type RaftEntry = openraft::Entry<TypeConfig>;

/// A stored or received value that does not decode.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A required message field was absent.
    #[error("{message}.{field} is missing")]
    Missing {
        /// The message type.
        message: &'static str,
        /// The field.
        field: &'static str,
    },
    /// Bytes that should hold a protobuf message do not decode.
    #[error("{what} does not decode: {source}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The decoder's error.
        #[source]
        source: prost::DecodeError,
    },
}

/// openraft numbers entries from 0 (the initial membership), the partition log from 1: the
/// partition-log index of a Raft entry is its Raft index plus one, so a publish's message offset
/// stays its partition-log index on every replica.
pub fn log_index(raft_index: u64) -> u64 {
    raft_index + 1
}

/// The Raft index of a partition-log index (log indices start at 1).
pub fn raft_index(log_index: u64) -> u64 {
    log_index.saturating_sub(1)
}

/// Builds a log id; in single-term-leader mode the committed leader is just the term.
pub fn log_id(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 0), index)
}

/// The bytes an entry is stored as: a `LogCommand` for normal entries, a `ControlEntry` else.
pub fn entry_data(entry: &RaftEntry) -> Bytes {
    let control = match &entry.payload {
        EntryPayload::Normal(data) => return data.clone(),
        EntryPayload::Blank => pb::control_entry::Control::Blank(pb::Blank {}),
        EntryPayload::Membership(m) => pb::control_entry::Control::Membership(membership_to_pb(m)),
    };
    Bytes::from(
        pb::ControlEntry {
            control: Some(control),
        }
        .encode_to_vec(),
    )
}

/// Rebuilds an openraft entry from a partition-log record.
pub fn entry_from_record(record: crate::log::Entry) -> Result<RaftEntry, CodecError> {
    decode_entry(record.term, raft_index(record.index), record.data)
}

/// Rebuilds an openraft entry at Raft position (`term`, `index`) from its stored bytes.
pub fn decode_entry(term: u64, index: u64, data: Bytes) -> Result<RaftEntry, CodecError> {
    // A LogCommand uses only low field numbers, which a ControlEntry decoder skips, so queue
    // commands decode here as an empty ControlEntry.
    let control = pb::ControlEntry::decode(data.as_ref()).map_err(|source| CodecError::Decode {
        what: "log entry",
        source,
    })?;
    let payload = match control.control {
        None => EntryPayload::Normal(data),
        Some(pb::control_entry::Control::Blank(_)) => EntryPayload::Blank,
        Some(pb::control_entry::Control::Membership(m)) => {
            EntryPayload::Membership(membership_from_pb(&m))
        }
    };
    Ok(openraft::Entry {
        log_id: log_id(term, index),
        payload,
    })
}

/// An entry for the wire (Raft index).
pub fn entry_to_pb(entry: &RaftEntry) -> pb::Entry {
    pb::Entry {
        term: entry.log_id.leader_id.term,
        index: entry.log_id.index,
        data: entry_data(entry).to_vec(),
    }
}

/// An entry from the wire.
pub fn entry_from_pb(entry: pb::Entry) -> Result<RaftEntry, CodecError> {
    decode_entry(entry.term, entry.index, Bytes::from(entry.data))
}

/// A log id for the wire.
pub fn log_id_to_pb(id: &LogId<NodeId>) -> pb::LogId {
    pb::LogId {
        term: id.leader_id.term,
        index: id.index,
    }
}

/// A log id from the wire.
pub fn log_id_from_pb(id: &pb::LogId) -> LogId<NodeId> {
    log_id(id.term, id.index)
}

/// An optional log id for the wire.
pub fn opt_log_id_to_pb(id: &Option<LogId<NodeId>>) -> Option<pb::LogId> {
    id.as_ref().map(log_id_to_pb)
}

/// An optional log id from the wire.
pub fn opt_log_id_from_pb(id: &Option<pb::LogId>) -> Option<LogId<NodeId>> {
    id.as_ref().map(log_id_from_pb)
}

/// A vote for the wire or the meta file.
pub fn vote_to_pb(vote: &Vote<NodeId>) -> pb::Vote {
    pb::Vote {
        term: vote.leader_id.term,
        node_id: vote.leader_id.voted_for,
        committed: vote.committed,
    }
}

/// A vote from the wire or the meta file.
pub fn vote_from_pb(vote: &pb::Vote) -> Vote<NodeId> {
    let mut v = Vote::new(vote.term, 0);
    v.leader_id.voted_for = vote.node_id;
    v.committed = vote.committed;
    v
}

/// A required vote field from the wire.
pub fn required_vote(
    vote: &Option<pb::Vote>,
    message: &'static str,
) -> Result<Vote<NodeId>, CodecError> {
    vote.as_ref().map(vote_from_pb).ok_or(CodecError::Missing {
        message,
        field: "vote",
    })
}

/// A membership for the wire or the log.
pub fn membership_to_pb(m: &Membership<NodeId, BasicNode>) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|set| pb::VoterSet {
                node_ids: set.iter().copied().collect(),
            })
            .collect(),
        nodes: m
            .nodes()
            .map(|(id, node)| pb::Node {
                node_id: *id,
                addr: node.addr.clone(),
            })
            .collect(),
    }
}

/// A membership from the wire or the log.
pub fn membership_from_pb(m: &pb::Membership) -> Membership<NodeId, BasicNode> {
    let configs: Vec<BTreeSet<NodeId>> = m
        .configs
        .iter()
        .map(|set| set.node_ids.iter().copied().collect())
        .collect();
    let nodes: BTreeMap<NodeId, BasicNode> = m
        .nodes
        .iter()
        .map(|n| (n.node_id, BasicNode::new(n.addr.clone())))
        .collect();
    Membership::new(configs, nodes)
}

/// A stored membership for the wire or a snapshot.
pub fn stored_membership_to_pb(m: &StoredMembership<NodeId, BasicNode>) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: opt_log_id_to_pb(m.log_id()),
        membership: Some(membership_to_pb(m.membership())),
    }
}

/// A stored membership from the wire or a snapshot.
pub fn stored_membership_from_pb(
    m: &Option<pb::StoredMembership>,
) -> StoredMembership<NodeId, BasicNode> {
    match m {
        Some(m) => StoredMembership::new(
            opt_log_id_from_pb(&m.log_id),
            m.membership
                .as_ref()
                .map(membership_from_pb)
                .unwrap_or_else(|| Membership::new(vec![], BTreeMap::new())),
        ),
        None => StoredMembership::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::storage::v1::{LogCommand, PublishCommand, log_command::Command};

    #[test]
    fn a_queue_command_round_trips_as_a_normal_entry_with_its_bytes_unchanged() {
        let command = LogCommand {
            command: Some(Command::Publish(PublishCommand {
                publish_time_ms: 7,
                ..Default::default()
            })),
        };
        let data = Bytes::from(command.encode_to_vec());
        let record = crate::log::Entry {
            index: 10,
            term: 3,
            data: data.clone(),
        };
        let entry = entry_from_record(record).expect("decodes");
        assert_eq!(entry.log_id, log_id(3, 9), "log index 10 is Raft index 9");
        assert!(matches!(&entry.payload, EntryPayload::Normal(d) if *d == data));
        assert_eq!(entry_data(&entry), data);
    }

    #[test]
    fn control_entries_round_trip_and_read_as_empty_queue_commands() {
        let membership = Membership::new(
            vec![BTreeSet::from([1, 2, 3])],
            BTreeMap::from([
                (1, BasicNode::new("a:1")),
                (2, BasicNode::new("b:2")),
                (3, BasicNode::new("c:3")),
            ]),
        );
        for payload in [
            EntryPayload::Blank,
            EntryPayload::Membership(membership.clone()),
        ] {
            let entry: RaftEntry = openraft::Entry {
                log_id: log_id(2, 5),
                payload,
            };
            let data = entry_data(&entry);
            let back = decode_entry(2, 5, data.clone()).expect("decodes");
            assert_eq!(back, entry);
            // The queue layer sees a LogCommand with no command: a no-op.
            let as_command = LogCommand::decode(data.as_ref()).expect("decodes as LogCommand");
            assert_eq!(as_command.command, None);
        }
    }

    #[test]
    fn garbage_bytes_are_an_error_naming_the_log_entry() {
        let err = decode_entry(1, 1, Bytes::from_static(&[0xff, 0xff])).unwrap_err();
        assert!(
            err.to_string().starts_with("log entry does not decode"),
            "{err}"
        );
    }

    #[test]
    fn votes_round_trip_through_the_wire_form() {
        let mut vote = Vote::new(4, 2);
        vote.committed = true;
        assert_eq!(vote_from_pb(&vote_to_pb(&vote)), vote);
        let unvoted = vote_from_pb(&pb::Vote {
            term: 1,
            node_id: None,
            committed: false,
        });
        assert_eq!(vote_to_pb(&unvoted).node_id, None);
    }
}
