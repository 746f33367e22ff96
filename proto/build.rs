//! Generates the Rust message types from `proto/*.proto` with prost.
//!
//! `protox` parses the .proto files in pure Rust, so no `protoc` is needed on the machine. The
//! compiled descriptors are kept as well (`FILE_DESCRIPTOR_SET`): the coordinator's JSON API
//! reads and writes messages in protobuf's JSON mapping from them.

use protox::prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/cleanroom.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("cleanroom.fds"), descriptors.encode_to_vec())?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
