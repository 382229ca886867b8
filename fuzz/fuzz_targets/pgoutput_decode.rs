//! Feeds arbitrary bytes to the pgoutput decoder: as one payload outside and inside a streamed
//! block, and as a sequence of payloads through one decoder so the Stream Start / Stop state is
//! exercised. Decoding must never panic, and whatever decodes must survive a re-encode.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use stagingprop::pgoutput::{Decoder, LogicalMessage, encode};

/// A decoded message, encoded again, decodes to the same message in the same decoder state.
fn check_reencode(streamed: bool, message: &LogicalMessage) {
    let mut decoder = Decoder::new();
    if streamed {
        decoder
            .decode(encode::stream_start(1, true))
            .expect("a synthetic Stream Start decodes");
    }
    let again = decoder.decode(encode::logical_message(message));
    assert_eq!(
        again.as_ref(),
        Ok(message),
        "re-encoded message decodes differently"
    );
}

fuzz_target!(|data: &[u8]| {
    let payload = Bytes::copy_from_slice(data);

    // One payload outside a stream.
    if let Ok(message) = Decoder::new().decode(payload.clone()) {
        if !matches!(message, LogicalMessage::StreamStart { .. }) {
            check_reencode(false, &message);
        }
    }

    // One payload inside a synthetic streamed block: the xid-prefixed paths.
    let mut streamed = Decoder::new();
    streamed
        .decode(encode::stream_start(1, true))
        .expect("a synthetic Stream Start decodes");
    if let Ok(message) = streamed.decode(payload.clone()) {
        if !matches!(message, LogicalMessage::StreamStop) {
            check_reencode(true, &message);
        }
    }

    // A sequence of payloads, each prefixed by one length byte, through one decoder.
    let mut decoder = Decoder::new();
    let mut rest = payload;
    while let Some(&len) = rest.first() {
        let _ = rest.split_to(1);
        let take = usize::from(len).min(rest.len());
        let _ = decoder.decode(rest.split_to(take));
    }
});
