//! Generated gRPC types and stubs. This is the only crate that derives prost types; the
//! services and the gateway convert to their own types at the boundary.

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("roomcast.v1");
}

pub use v1::*;

/// The encoded descriptors of every Roomcast proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("roomcast");
