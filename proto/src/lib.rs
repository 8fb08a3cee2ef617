//! gRPC contracts of the center (`proto/consortium/v1/*.proto`) and the Rust
//! code tonic/prost generate from them. Only `viewer-api` (and clients)
//! depend on this crate; nothing below it knows about protobuf.

/// Package `consortium.v1`.
pub mod v1 {
    #![allow(clippy::all, unreachable_pub, missing_docs)]
    tonic::include_proto!("consortium.v1");

    /// Encoded `FileDescriptorSet` of the package, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("consortium_v1_descriptor");
}
