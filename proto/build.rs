//! Generates the gRPC code. protoc comes from `protoc-bin-vendored` so that a fresh machine
//! builds with `cargo build` alone; an explicit `PROTOC` still wins.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment yet.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("PROTOC", protoc);
        }
    }
    println!("cargo:rerun-if-changed=proto");
    // The descriptor set feeds gRPC server reflection (grpcurl without the .proto files).
    let descriptor = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("roomcast.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(descriptor)
        .compile_protos(
            &[
                "proto/roomcast/v1/status.proto",
                "proto/roomcast/v1/auth.proto",
                "proto/roomcast/v1/room.proto",
                "proto/roomcast/v1/server_api.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
