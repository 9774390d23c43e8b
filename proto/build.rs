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
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/roomcast/v1/auth.proto",
            "proto/roomcast/v1/room.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
