//! Binds the gRPC and metrics listeners, serves, and drains on shutdown.
