//! Decodes arbitrary bytes as a sequence of log records, the way recovery walks a segment.
//! The decoder must never panic, never read past its input, and every record it accepts must
//! re-encode to exactly the bytes it was decoded from (so its checksum truly matched).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_agent::log::record;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(rec) = record::decode(rest) {
        let len = rec.encoded_len();
        let mut reencoded = Vec::with_capacity(len);
        record::encode(&mut reencoded, rec.index, rec.term, rec.data);
        assert_eq!(
            &rest[..len],
            &reencoded[..],
            "accepted a record that does not re-encode"
        );
        rest = &rest[len..];
    }
    // The torn-tail scan must also stay in bounds on any input.
    for at in 0..rest.len().min(64) {
        let _ = record::is_valid_record_at(&rest[at..]);
    }
});
