//! Benchmark harness entry point. The workloads land with the performance issue; until then
//! this only says so, so that the workspace layout is fixed from the start.

fn main() {
    eprintln!("strata-bench: no workloads yet (see benches/README.md)");
}
