//! The shared shutdown signal.
