//! Compiles the spool record definitions (proto/spool.proto) with prost, using protox (a
//! protobuf compiler written in Rust), so the build needs no system `protoc`.

fn main() {
    println!("cargo:rerun-if-changed=proto/spool.proto");
    let descriptors = protox::compile(["proto/spool.proto"], ["proto"])
        .unwrap_or_else(|e| panic!("proto/spool.proto does not compile: {e}"));
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("cannot generate the spool record types: {e}"));
}
