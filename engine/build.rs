//! Compiles the vendored ONNX protobuf schema (`proto/onnx.proto`) into Rust types for the
//! gradient builder (`src/grad`). `protox` parses the schema in pure Rust, so no `protoc` binary
//! is needed on build machines.

fn main() {
    let proto = "proto/onnx.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"]).unwrap_or_else(|e| {
        panic!("cannot parse {proto}: {e}");
    });
    prost_build::Config::new()
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("cannot generate Rust code from {proto}: {e}"));
}
