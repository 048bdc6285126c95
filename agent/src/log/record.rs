//! The on-disk record format: a fixed 28-byte header followed by the entry's data.
//!
//! ```text
//! offset size field
//!      0    2 magic     0x53 0x4C ("SL")
//!      2    1 version   1
//!      3    1 reserved  0
//!      4    4 data_len  u32 little-endian, at most MAX_DATA_BYTES
//!      8    8 index     u64 little-endian
//!     16    8 term      u64 little-endian
//!     24    4 crc32     of bytes 0..24 and the data (crc32fast, IEEE polynomial)
//!     28    … data
//! ```
//!
//! The checksum covers every header field, so a flipped bit anywhere in a record is caught;
//! the magic lets recovery tell zero-filled or foreign bytes from a record without computing
//! a checksum. Decoding never trusts the length before bounding it.

use bytes::{BufMut, Bytes};

use super::Entry;

/// Bytes of the fixed header.
pub const HEADER_BYTES: usize = 28;
/// Largest data of one entry. Far above any message the queue accepts; a length beyond it can
/// only be corruption, so it is reported as such instead of being allocated.
pub const MAX_DATA_BYTES: usize = 64 * 1024 * 1024;
/// First bytes of every record.
pub const MAGIC: [u8; 2] = *b"SL";
const VERSION: u8 = 1;
const CRC_OFFSET: usize = 24;

/// Why bytes do not decode into a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The buffer ends before the record does; `needed` is the whole record's size when the
    /// header was readable, else the header size.
    Incomplete {
        /// Bytes the record needs in total.
        needed: usize,
    },
    /// The bytes are not a record of this format.
    Invalid(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Incomplete { needed } => write!(f, "incomplete record ({needed} bytes needed)"),
            Self::Invalid(reason) => f.write_str(reason),
        }
    }
}

/// A record decoded from a buffer, its data borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Log index.
    pub index: u64,
    /// Raft term.
    pub term: u64,
    /// The entry's data.
    pub data: &'a [u8],
}

impl Record<'_> {
    /// Bytes the record occupies on disk.
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES + self.data.len()
    }

    /// The record as an owned [`Entry`] (copies the data).
    pub fn to_entry(&self) -> Entry {
        Entry {
            index: self.index,
            term: self.term,
            data: Bytes::copy_from_slice(self.data),
        }
    }
}

/// Size on disk of a record carrying `data_len` bytes.
pub fn encoded_len(data_len: usize) -> usize {
    HEADER_BYTES + data_len
}

/// Appends the encoding of one record to `out`. The caller bounds `data` by
/// [`MAX_DATA_BYTES`] (append rejects larger entries before they reach the encoder).
pub fn encode(out: &mut Vec<u8>, index: u64, term: u64, data: &[u8]) {
    debug_assert!(data.len() <= MAX_DATA_BYTES);
    let start = out.len();
    out.reserve(HEADER_BYTES + data.len());
    out.put_slice(&MAGIC);
    out.put_u8(VERSION);
    out.put_u8(0);
    out.put_u32_le(data.len() as u32);
    out.put_u64_le(index);
    out.put_u64_le(term);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[start..]);
    crc.update(data);
    out.put_u32_le(crc.finalize());
    out.put_slice(data);
}

/// Decodes the record at the start of `buf`. Never panics, whatever the bytes: every length is
/// bounded before use and every record returned has a matching checksum.
pub fn decode(buf: &[u8]) -> Result<Record<'_>, DecodeError> {
    let Some(header) = buf.get(..HEADER_BYTES) else {
        // Check what is there so garbage is reported as such, not as "incomplete".
        check_prefix(buf)?;
        return Err(DecodeError::Incomplete {
            needed: HEADER_BYTES,
        });
    };
    check_prefix(header)?;
    let data_len = u32::from_le_bytes(array(&header[4..8])) as usize;
    if data_len > MAX_DATA_BYTES {
        return Err(DecodeError::Invalid(format!(
            "data length {data_len} exceeds the maximum {MAX_DATA_BYTES}"
        )));
    }
    let index = u64::from_le_bytes(array(&header[8..16]));
    let term = u64::from_le_bytes(array(&header[16..24]));
    let stored_crc = u32::from_le_bytes(array(&header[CRC_OFFSET..HEADER_BYTES]));
    let needed = HEADER_BYTES + data_len;
    let Some(data) = buf.get(HEADER_BYTES..needed) else {
        return Err(DecodeError::Incomplete { needed });
    };
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[..CRC_OFFSET]);
    crc.update(data);
    let actual_crc = crc.finalize();
    if actual_crc != stored_crc {
        return Err(DecodeError::Invalid(format!(
            "checksum mismatch (stored {stored_crc:#010x}, computed {actual_crc:#010x})"
        )));
    }
    Ok(Record { index, term, data })
}

/// Validates magic, version and the reserved byte of a (possibly partial) header.
fn check_prefix(prefix: &[u8]) -> Result<(), DecodeError> {
    let magic_len = prefix.len().min(MAGIC.len());
    if prefix[..magic_len] != MAGIC[..magic_len] {
        return Err(DecodeError::Invalid("bad magic (not a record)".into()));
    }
    if let Some(&version) = prefix.get(2)
        && version != VERSION
    {
        return Err(DecodeError::Invalid(format!(
            "unsupported record version {version}"
        )));
    }
    if let Some(&reserved) = prefix.get(3)
        && reserved != 0
    {
        return Err(DecodeError::Invalid(format!(
            "reserved header byte is {reserved}, not 0"
        )));
    }
    Ok(())
}

/// Whether a full, checksum-valid record starts at `buf[0]`. Used by recovery to tell a torn
/// tail (nothing valid follows) from corruption (valid records follow).
pub fn is_valid_record_at(buf: &[u8]) -> bool {
    // The magic check is a cheap filter so scanning garbage byte by byte stays fast.
    buf.starts_with(&MAGIC) && decode(buf).is_ok()
}

fn array<const N: usize>(slice: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(slice);
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_record_round_trips_with_its_index_term_and_data() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, 3, b"hello");
        encode(&mut buf, 8, 3, b"");
        let first = decode(&buf).expect("first");
        assert_eq!((first.index, first.term, first.data), (7, 3, &b"hello"[..]));
        assert_eq!(first.encoded_len(), HEADER_BYTES + 5);
        let second = decode(&buf[first.encoded_len()..]).expect("second");
        assert_eq!((second.index, second.data.len()), (8, 0));
    }

    #[test]
    fn every_single_bit_flip_in_a_record_is_detected() {
        let mut buf = Vec::new();
        encode(&mut buf, 42, 9, b"payload bytes");
        for bit in 0..buf.len() * 8 {
            let mut flipped = buf.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            match decode(&flipped) {
                Ok(record) => panic!("bit {bit} flip decoded as {record:?}"),
                // A flipped length bit may make the record look longer than the buffer.
                Err(DecodeError::Invalid(_) | DecodeError::Incomplete { .. }) => {}
            }
        }
    }

    #[test]
    fn a_prefix_is_incomplete_and_zeros_or_garbage_are_invalid() {
        let mut buf = Vec::new();
        encode(&mut buf, 1, 1, b"abcdef");
        for cut in 0..buf.len() {
            assert!(
                matches!(decode(&buf[..cut]), Err(DecodeError::Incomplete { .. })),
                "prefix of {cut} bytes"
            );
        }
        assert!(matches!(decode(&[0u8; 64]), Err(DecodeError::Invalid(_))));
        assert!(matches!(
            decode(b"garbage garbage garbage garbage"),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn an_absurd_length_is_invalid_not_incomplete() {
        let mut buf = Vec::new();
        encode(&mut buf, 1, 1, b"x");
        buf[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = decode(&buf).expect_err("absurd length");
        assert!(
            matches!(&err, DecodeError::Invalid(r) if r.contains("exceeds")),
            "{err}"
        );
    }

    fn recheck(buf: &[u8], record: &Record<'_>) {
        // An accepted record must carry a checksum that matches its own bytes.
        let mut reencoded = Vec::new();
        encode(&mut reencoded, record.index, record.term, record.data);
        assert_eq!(&buf[..record.encoded_len()], &reencoded[..]);
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(record) = decode(&bytes) {
                recheck(&bytes, &record);
            }
        }

        #[test]
        fn decoding_mutated_records_never_yields_a_wrong_record(
            data in proptest::collection::vec(any::<u8>(), 0..200),
            index in any::<u64>(),
            term in any::<u64>(),
            mutations in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let mut buf = Vec::new();
            encode(&mut buf, index, term, &data);
            let original = buf.clone();
            for (at, xor) in mutations {
                let at = at % buf.len();
                buf[at] ^= xor;
            }
            let cut = cut % (buf.len() + 1);
            let mutated = &buf[..cut.max(buf.len() / 2)];
            if let Ok(record) = decode(mutated) {
                recheck(mutated, &record);
                if buf != original {
                    // Collisions of crc32 are possible in principle, but a mutation that keeps
                    // the same length and passes the checksum must then equal the original.
                    prop_assert_eq!(&mutated[..record.encoded_len()], &original[..record.encoded_len()]);
                }
            }
        }
    }
}
