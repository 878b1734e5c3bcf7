//! Compiles kiln.v1 with protox (a pure-Rust protobuf compiler), so building Kiln
//! needs no system `protoc`. The encoded descriptor set is also written to OUT_DIR
//! for the gRPC reflection service.
//!
//! Also compiles the vendored Remote Workers API (google.devtools.remoteworkers.v1test2),
//! the bot side of a remote-execution scheduler. The types it shares with the Remote
//! Execution API (google.rpc, google.protobuf, google.api) come from the
//! `bazel-remote-apis` crate, so a Lease's payload and an ActionResult use the same types.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/kiln/v1/kiln.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("kiln_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::KilnCodec")
        .compile_fds(descriptors)?;

    compile_remote_workers()
}

fn compile_remote_workers() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/google");
    let protos = [
        "proto/google/devtools/remoteworkers/v1test2/bots.proto",
        "proto/google/devtools/remoteworkers/v1test2/worker.proto",
        "proto/google/devtools/remoteworkers/v1test2/command.proto",
    ];
    // The imported files stay in the set (prost needs their messages to derive traits);
    // only the Remote Workers package is included by the crate, the rest maps to
    // `bazel-remote-apis`.
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        // The server side is for in-process test schedulers.
        .build_server(true)
        // The well-known types map to the crate rather than to prost-types, except
        // FieldMask, the one the crate does not generate.
        .compile_well_known_types(true)
        .extern_path(".google.protobuf.FieldMask", "::prost_types::FieldMask")
        .extern_path(".google.protobuf", "::bazel_remote_apis::google::protobuf")
        .extern_path(".google.rpc", "::bazel_remote_apis::google::rpc")
        .extern_path(".google.api", "::bazel_remote_apis::google::api")
        .compile_fds(descriptors)?;
    Ok(())
}
