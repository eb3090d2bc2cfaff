//! `stratafs`: mount a stack of layers as one union filesystem (fuse-overlayfs command line).

use std::process::ExitCode;

use strata_fs::daemon;
use strata_fs::options::MountConfig;

fn main() -> ExitCode {
    let cfg = match MountConfig::from_args(std::env::args_os()) {
        Ok(Ok(cfg)) => cfg,
        Ok(Err(e)) => return daemon::fail(&e),
        // --help, --version, and clap's own usage errors.
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            if e.use_stderr() {
                let msg = e.to_string();
                let first = msg.lines().next().unwrap_or("invalid arguments");
                eprintln!("stratafs: {}", first.trim_start_matches("error: "));
            } else {
                let _ = e.print();
            }
            return ExitCode::from(code);
        }
    };
    daemon::run(cfg)
}
