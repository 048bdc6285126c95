//! Delivery semantics of partitions and queues.
