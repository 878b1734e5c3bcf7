//! The `kiln.v1` gRPC API shared by the daemon and its clients. Generated code, and the codec it uses.
#![forbid(unsafe_code)]

pub mod codec;

/// `kiln.v1`: jobs, content store and attestations.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("kiln.v1");
}

/// Encoded `FileDescriptorSet` of `kiln.v1`, served by gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kiln_descriptor");
