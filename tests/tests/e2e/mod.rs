//! Support of the StatefulSet end-to-end test: the pods of the operator's StatefulSet run as
//! local processes ([`pods`]) and the client load with its ledger ([`workload`]).

pub mod pods;
pub mod workload;
