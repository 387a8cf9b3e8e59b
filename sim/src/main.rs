//! The `wgmesh-sim` command line.
fn main() {}
