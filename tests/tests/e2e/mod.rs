//! Support of the StatefulSet end-to-end test: the pods of the operator's StatefulSet run as
//! local processes ([`pods`]). Its client load is `support::workload`, shared with the
//! control-plane test.

pub mod pods;
