//! `strata`: runs one namespaced process on top of a stratafs layer stack (`strata run`), and
//! `strata demo`, a container on the host's own root directory.

mod demo;
mod run;

use clap::{Parser, Subcommand};

/// Command line of the `strata` runner.
#[derive(Parser, Debug)]
#[command(
    name = "strata",
    version,
    about = "Layered filesystems as a plain userspace tool"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a command in fresh namespaces on a stratafs view of read-only layers.
    Run(Box<run::spec::RunArgs>),
    /// Run a container on the host's own / (read-only) and show that its writes stay inside.
    Demo,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => std::process::exit(run::run(*args)),
        Cmd::Demo => demo::run(),
    };
    if let Err(e) = result {
        eprintln!("strata: {e:#}");
        std::process::exit(1);
    }
}
