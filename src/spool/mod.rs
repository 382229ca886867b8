//! The durable spool (docs/design.md, "Outages and replay").

pub mod record;
pub mod segment;
pub mod store;

/// The record types generated from proto/spool.proto.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/stagingprop.spool.v1.rs"));
}
