//! Generated gRPC types and stubs. This is the only crate that derives prost types; the
//! services and the gateway convert to their own types at the boundary.

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("roomcast.v1");
}

pub use v1::*;

/// The encoded descriptors of every Roomcast proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("roomcast");

/// Maximum number of requests in one batch call (`VerifyTokens`, `ConnectionsOpened`,
/// `ConnectionsClosed`).
pub const MAX_BATCH: usize = 1024;

impl ItemStatus {
    /// The outcome of one request of a batch, from what its single call answered.
    pub fn of<T>(result: &Result<T, tonic::Status>) -> Self {
        match result {
            Ok(_) => Self::default(),
            Err(status) => Self {
                code: status.code() as i32,
                message: status.message().to_owned(),
            },
        }
    }

    /// `Ok(())` for OK, else the status the single call would have failed with.
    pub fn into_result(self) -> Result<(), tonic::Status> {
        match tonic::Code::from_i32(self.code) {
            tonic::Code::Ok => Ok(()),
            code => Err(tonic::Status::new(code, self.message)),
        }
    }
}
