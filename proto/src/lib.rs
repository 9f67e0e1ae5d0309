//! Generated code for onehead's .proto contracts. Domain types are converted by hand at the edges;
//! nothing here leaks into the engine. `serving` holds what both gRPC servers do below their
//! services: accepting connections, closing silent ones, the status of an oversized message.

pub mod serving;

/// `onehead.worker.v1`: the router-to-worker API.
pub mod worker {
    pub mod v1 {
        tonic::include_proto!("onehead.worker.v1");
    }
}

/// `onehead.v1`: the public API.
pub mod v1 {
    tonic::include_proto!("onehead.v1");
}

/// Encoded `FileDescriptorSet` of every onehead proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("onehead_descriptor");
