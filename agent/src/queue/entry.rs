//! What a partition-log entry holds, and how a command's offset names its place.
//!
//! A log entry holds one encoded `LogCommand`, or a `CommandBatch` of several: the leader of a
//! replicated partition packs everything that waits for Raft into one entry, because openraft
//! 0.9 writes and fsyncs one entry at a time (decision 0013). A command's *offset* is
//! `entry_index << SLOT_BITS | position`, so it is stable on every replica, increases in log
//! order, and finds its entry without an index.

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use sluice_proto::storage::v1::{CommandBatch, LogCommand, log_command::Command};

/// Bits of an offset that give the command's position within its entry.
pub const SLOT_BITS: u32 = 16;
/// Most commands one entry may hold.
pub const MAX_COMMANDS_PER_ENTRY: usize = 1 << SLOT_BITS;

/// The offset of the command at `slot` of entry `entry`.
pub fn offset(entry: u64, slot: u32) -> u64 {
    (entry << SLOT_BITS) | u64::from(slot)
}

/// The entry an offset lives in.
pub fn entry_of(offset: u64) -> u64 {
    offset >> SLOT_BITS
}

/// An offset's position within its entry.
pub fn slot_of(offset: u64) -> u32 {
    (offset & ((1 << SLOT_BITS) - 1)) as u32
}

/// A log entry whose data is not a valid command or batch.
#[derive(Debug, thiserror::Error)]
pub enum BadEntry {
    /// The data does not decode.
    #[error("log entry {index} is not a valid command: {source}")]
    Decode {
        /// The entry's index.
        index: u64,
        /// The decoding error.
        #[source]
        source: prost::DecodeError,
    },
    /// A batch holds a batch, or more commands than an entry may.
    #[error("log entry {index} is a malformed batch: {reason}")]
    Batch {
        /// The entry's index.
        index: u64,
        /// What is wrong.
        reason: String,
    },
}

/// The commands of the entry at `index`, in position order.
pub fn decode(index: u64, data: &[u8]) -> Result<Vec<LogCommand>, BadEntry> {
    let command = LogCommand::decode(data).map_err(|source| BadEntry::Decode { index, source })?;
    let Some(Command::Batch(batch)) = command.command else {
        return Ok(vec![command]);
    };
    if batch.commands.len() > MAX_COMMANDS_PER_ENTRY {
        return Err(BadEntry::Batch {
            index,
            reason: format!(
                "{} commands, at most {MAX_COMMANDS_PER_ENTRY}",
                batch.commands.len()
            ),
        });
    }
    batch
        .commands
        .iter()
        .enumerate()
        .map(|(slot, data)| {
            let command = LogCommand::decode(data.as_ref()).map_err(|source| BadEntry::Batch {
                index,
                reason: format!("command {slot}: {source}"),
            })?;
            if matches!(command.command, Some(Command::Batch(_))) {
                return Err(BadEntry::Batch {
                    index,
                    reason: format!("command {slot} is itself a batch"),
                });
            }
            Ok(command)
        })
        .collect()
}

/// The command at `slot` of the entry at `index` (decoding only that one of a batch).
pub fn decode_at(index: u64, data: &[u8], slot: u32) -> Result<Option<LogCommand>, BadEntry> {
    let command = LogCommand::decode(data).map_err(|source| BadEntry::Decode { index, source })?;
    match command.command {
        Some(Command::Batch(batch)) => batch
            .commands
            .get(slot as usize)
            .map(|data| {
                LogCommand::decode(data.as_ref()).map_err(|source| BadEntry::Batch {
                    index,
                    reason: format!("command {slot}: {source}"),
                })
            })
            .transpose(),
        _ if slot == 0 => Ok(Some(command)),
        _ => Ok(None),
    }
}

/// The data of an entry holding `commands` (each an encoded `LogCommand`): the command itself
/// when there is one, else a batch.
pub fn encode(mut commands: Vec<Bytes>) -> Bytes {
    if commands.len() == 1 {
        return commands.pop().unwrap_or_default();
    }
    let batch = LogCommand {
        command: Some(Command::Batch(CommandBatch { commands })),
    };
    let mut buf = BytesMut::with_capacity(batch.encoded_len());
    batch.encode_raw(&mut buf);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::storage::v1::{DeliverCommand, PublishCommand};

    fn publish(n: u64) -> LogCommand {
        LogCommand {
            command: Some(Command::Publish(PublishCommand {
                publish_time_ms: n,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn offsets_order_by_entry_then_position() {
        assert!(offset(1, 65535) < offset(2, 0));
        assert_eq!(entry_of(offset(7, 3)), 7);
        assert_eq!(slot_of(offset(7, 3)), 3);
    }

    #[test]
    fn a_single_command_is_stored_as_itself_and_a_batch_decodes_in_order() {
        let one = encode(vec![publish(1).encode_to_vec().into()]);
        assert_eq!(one, Bytes::from(publish(1).encode_to_vec()));
        assert_eq!(decode(1, &one).unwrap(), vec![publish(1)]);
        let many = encode((0..3).map(|n| publish(n).encode_to_vec().into()).collect());
        assert_eq!(
            decode(2, &many).unwrap(),
            vec![publish(0), publish(1), publish(2)]
        );
        assert_eq!(decode_at(2, &many, 2).unwrap(), Some(publish(2)));
        assert_eq!(decode_at(2, &many, 3).unwrap(), None);
        assert_eq!(decode_at(1, &one, 1).unwrap(), None);
    }

    #[test]
    fn a_batch_inside_a_batch_is_refused_naming_the_entry_and_position() {
        let inner = encode(vec![
            publish(0).encode_to_vec().into(),
            publish(1).encode_to_vec().into(),
        ]);
        let nested = encode(vec![publish(2).encode_to_vec().into(), inner]);
        let err = decode(9, &nested).unwrap_err().to_string();
        assert!(
            err.contains("entry 9") && err.contains("command 1"),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        let deliver = LogCommand {
            command: Some(Command::Deliver(DeliverCommand::default())),
        };
        assert!(decode(1, &deliver.encode_to_vec()).is_ok());
        assert!(decode(3, &[0xff, 0xff, 0xff]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_or_fail_without_panicking_and_positions_agree(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)
        ) {
            if let Ok(commands) = decode(1, &data) {
                for (slot, command) in (0..).zip(&commands) {
                    let at = decode_at(1, &data, slot).expect("decode accepted it");
                    proptest::prop_assert_eq!(at.as_ref(), Some(command));
                }
            }
        }

        #[test]
        fn packed_commands_decode_to_what_was_packed(
            times in proptest::collection::vec(proptest::prelude::any::<u64>(), 1..50)
        ) {
            let commands: Vec<LogCommand> = times.iter().map(|&t| publish(t)).collect();
            let data = encode(commands.iter().map(|c| c.encode_to_vec().into()).collect());
            proptest::prop_assert_eq!(decode(4, &data).expect("valid"), commands);
        }
    }
}
