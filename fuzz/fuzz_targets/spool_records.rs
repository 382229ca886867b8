//! Feeds arbitrary bytes to the readers of spooled and published transactions: a spool segment
//! scanned frame by frame (each intact frame's record decoded and turned back into a pgoutput
//! message), one record payload alone, and a JetStream chunk (framed records). Nothing may
//! panic, and a frame the scan calls intact lies inside the data.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use stagingprop::spool::record;
use stagingprop::spool::segment::{Scan, next_frame};
use stagingprop::stream::chunk;

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);

    let mut at = 0;
    loop {
        match next_frame(data, at) {
            Scan::Frame { payload, next } => {
                assert!(payload.start >= at && payload.end <= data.len() && next > at);
                if let Ok(r) = record::decode(bytes.slice(payload)) {
                    let _ = record::from_record(r);
                }
                at = next;
            }
            Scan::End | Scan::Torn | Scan::Corrupt { .. } => break,
        }
    }

    if let Ok(r) = record::decode(bytes.clone()) {
        let _ = record::from_record(r);
    }

    let _ = chunk::decode(&bytes);
});
