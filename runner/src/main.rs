//! `strata`: runs one namespaced process on top of a stratafs layer stack.
//!
//! The container runner lands with its own issue; today the binary offers `strata demo`,
//! which builds a small layer stack, mounts it with `stratafs` and shows the merged view,
//! and `strata commit`, which turns a container's writable layer into an OCI layer.

mod commit;
mod demo;

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
    /// Build a small built-in layer stack, mount it with stratafs and show the merged view.
    Demo,
    /// Turn a container's writable layer into a read-only layer directory in OCI form.
    Commit(commit::CommitArgs),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => usage_error(e),
    };
    let result = match &cli.command {
        Cmd::Demo => demo::run(),
        Cmd::Commit(args) => commit::run(args),
    };
    if let Err(e) = result {
        eprintln!("strata: {e:#}");
        std::process::exit(1);
    }
}

/// `--help` and `--version` print as usual; a usage error is one line on stderr, exit 2.
fn usage_error(e: clap::Error) -> ! {
    if !e.use_stderr() {
        e.exit();
    }
    let msg = e.to_string();
    let first = msg.lines().next().unwrap_or("invalid arguments");
    eprintln!("strata: {}", first.trim_start_matches("error: "));
    std::process::exit(2);
}
