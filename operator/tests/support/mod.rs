//! Test helpers: an in-process stateful fake of the Kubernetes API and a fake agent admin.

pub mod fake_admin;
pub mod fake_api;
pub mod managed_fields;
