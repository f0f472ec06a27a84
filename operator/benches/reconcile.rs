//! Reconcile benchmark.
fn main() {}
