//! `sluice-agent`: the queue agent binary.

fn main() {}
