//! Feeds arbitrary bytes to the replication connection's parsers as if a server sent them: cut
//! into backend messages, each parsed by its tag the way the connection would (authentication
//! requests, parameter status, row descriptions, data rows, errors, CopyData frames of the WAL
//! stream). Nothing may panic, and a message is never taken longer than the limit allows.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use stagingprop::pg::backend::{self, AuthRequest, MAX_MESSAGE_LEN};
use stagingprop::pg::frames::{self, ServerCopyData};

fuzz_target!(|data: &[u8]| {
    // The first byte says how the bytes arrive: in reads of 1..=256 bytes.
    let Some((&step, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(step) + 1;
    let mut buf = BytesMut::new();
    let mut fed = 0;
    loop {
        match backend::take_frame(&mut buf) {
            Ok(Some(frame)) => {
                assert!(frame.body.len() + 4 <= MAX_MESSAGE_LEN);
                match frame.tag {
                    b'R' => {
                        if let Ok(AuthRequest::Other(code)) = AuthRequest::parse(frame.body) {
                            let _ = backend::auth_method_name(code);
                        }
                    }
                    b'S' => {
                        if let Some((_, value)) = backend::parameter_status(frame.body) {
                            let _ = backend::server_version_num(&value);
                        }
                    }
                    b'T' => {
                        let _ = backend::row_description(frame.body);
                    }
                    b'D' => {
                        let _ = backend::data_row(frame.body);
                    }
                    b'E' | b'N' => {
                        let _ = stagingprop::pg::ServerError::parse(&frame.body).to_string();
                    }
                    b'd' => {
                        if let Ok(ServerCopyData::XLogData {
                            wal_start,
                            wal_end,
                            payload,
                            ..
                        }) = frames::parse_server_copy_data(frame.body)
                        {
                            let _ = (wal_start, wal_end, payload.len());
                        }
                    }
                    _ => {}
                }
            }
            Ok(None) => {
                if fed == data.len() {
                    break;
                }
                let next = (fed + step).min(data.len());
                buf.extend_from_slice(&data[fed..next]);
                fed = next;
            }
            Err(_) => break,
        }
    }
});
