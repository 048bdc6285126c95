//! Public gRPC services, one file per service; errors become `tonic::Status` in `status`.
