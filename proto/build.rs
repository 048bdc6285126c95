//! Compiles `sluice/v1/*.proto`, the internal `sluice/storage/v1/*.proto` and the peers-only
//! `sluice/peer/v1/*.proto` with protox (pure Rust), so no system `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "sluice/v1/sluice.proto",
        "sluice/storage/v1/log.proto",
        "sluice/peer/v1/peer.proto",
        "sluice/peer/v1/cluster.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // The encoded descriptor set feeds gRPC server reflection on the client port, which must
    // not advertise the peers-only Raft service it does not serve.
    let mut reflected = fds.clone();
    reflected.file.retain(|f| f.package() != "sluice.peer.v1");
    std::fs::write(
        out.join("sluice_descriptor.bin"),
        prost::Message::encode_to_vec(&reflected),
    )?;
    tonic_prost_build::configure()
        // A batch entry's commands decode as slices of the entry, not copies.
        .bytes(".sluice.storage.v1.CommandBatch.commands")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
