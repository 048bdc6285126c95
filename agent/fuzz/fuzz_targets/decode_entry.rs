//! Decodes arbitrary bytes as a partition-log entry's data (one command or a packed batch), as
//! replay, a follower's apply and a body read do. It must never panic, and wherever `decode`
//! accepts an entry, `decode_at` must agree with it position by position.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_agent::queue::entry;

fuzz_target!(|data: &[u8]| {
    if let Ok(commands) = entry::decode(1, data) {
        for (slot, command) in (0..).zip(&commands) {
            let at = entry::decode_at(1, data, slot).expect("decode accepted the entry");
            assert_eq!(at.as_ref(), Some(command), "position {slot} disagrees");
        }
    }
});
