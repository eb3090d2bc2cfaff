//! `strata`: runs one namespaced process on top of a stratafs layer stack.
//!
//! Only the command surface exists so far; the runner itself lands with its own issue.

use clap::Parser;

/// Command line of the `strata` runner.
#[derive(Parser, Debug)]
#[command(
    name = "strata",
    version,
    about = "Run a process on a stack of read-only layers"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("strata run is not implemented yet; use stratafs to mount layers")
}
