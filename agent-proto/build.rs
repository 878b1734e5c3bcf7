//! Compiles kiln.v1 with protox (a pure-Rust protobuf compiler), so building Kiln
//! needs no system `protoc`. The encoded descriptor set is also written to OUT_DIR
//! for the gRPC reflection service.

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
    Ok(())
}
