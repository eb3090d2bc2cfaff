//! `strata`: runs one namespaced process on top of a stratafs layer stack (`strata run`),
//! turns a container's writable layer into an OCI layer (`strata commit`), and shows both on
//! the host's own root directory (`strata demo`).

mod commit;
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
    /// Turn a container's writable layer into a read-only layer directory in OCI form.
    Commit(commit::CommitArgs),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => usage_error(e),
    };
    let result = match cli.command {
        Cmd::Run(args) => std::process::exit(run::run(*args)),
        Cmd::Demo => demo::run(),
        Cmd::Commit(args) => commit::run(&args),
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
    let mut lines = msg.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or("invalid arguments");
    let mut line = first.trim_start_matches("error: ").to_string();
    // clap puts what is missing on the next, indented lines.
    if line.ends_with(':') {
        let missing: Vec<&str> = lines
            .take_while(|l| l.starts_with("  "))
            .map(str::trim)
            .collect();
        line = format!("{line} {}", missing.join(", "));
    }
    eprintln!("strata: {line}");
    std::process::exit(2);
}
