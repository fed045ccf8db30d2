//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and writes the
//! encoded descriptor set that the reflection service serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO: &str = "proto/token_broker/v1/token_broker.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    println!("cargo:rerun-if-changed=build.rs");
    // protox keeps source info, so doc comments show in `grpcurl describe`.
    let fds = protox::compile([PROTO], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // tonic-prost-build ignores `file_descriptor_set_path` with `compile_fds`,
    // so the descriptor set for reflection is written here.
    fs::write(out.join("token_broker_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}
