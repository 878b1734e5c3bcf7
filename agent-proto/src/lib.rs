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

/// The Remote Workers API (`google.devtools.remoteworkers.v1test2`, vendored from googleapis
/// under the Apache License 2.0): the bot side of a remote-execution scheduler such as
/// BuildGrid. Its shared types (`google.rpc.Status`, `google.protobuf.Any`, ...) are those of
/// [`bazel_remote_apis`], re-exported here so that both sides name one version.
pub mod remoteworkers {
    pub mod v1test2 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("google.devtools.remoteworkers.v1test2");
    }
}

/// The Remote Execution API v2, ByteStream, longrunning and google.rpc types.
pub use bazel_remote_apis;

/// `google.protobuf.FieldMask` of `UpdateBotSessionRequest.update_mask` (the one well-known
/// type the Remote Workers API uses that `bazel-remote-apis` does not generate).
pub use prost_types;
