//! `strata`: runs one namespaced process on top of a stratafs layer stack.
//!
//! The container runner lands with its own issue; today the binary offers `strata demo`,
//! which builds a small layer stack, mounts it with `stratafs` and shows the merged view.

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
    /// Build a small built-in layer stack, mount it with stratafs and show the merged view.
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
