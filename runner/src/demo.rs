//! `strata demo`: a container on the host's own root directory, with nothing to download.
//!
//! Runs `strata run --layer / -- sh -c SCRIPT`: the host's `/` is the read-only base layer
//! and the writable layer is thrown away at exit. The script changes files inside; the demo
//! then shows that the host's copies did not change.

use std::fs;
use std::process::Command;

use anyhow::{bail, Context, Result};

const WATCHED: [&str; 2] = ["/etc/hostname", "/etc/os-release"];

const SCRIPT: &str = r#"
echo "inside:  hostname $(hostname), I am $(id -un) (uid $(id -u)), my shell is pid $$"
echo "inside:  processes visible: $(ls /proc | grep -c '^[0-9]')"
echo "changed in the container" > /etc/hostname
rm /etc/os-release
echo "inside:  /etc/hostname now says: $(cat /etc/hostname)"
test -e /etc/os-release || echo "inside:  /etc/os-release is deleted"
"#;

fn snapshot() -> Vec<(String, Option<Vec<u8>>)> {
    WATCHED
        .iter()
        .map(|p| (p.to_string(), fs::read(p).ok()))
        .collect()
}

/// Runs the demo.
pub fn run() -> Result<()> {
    let me = std::env::current_exe().context("finding the strata binary")?;
    let before = snapshot();
    println!("$ strata run --layer / -- sh -c '<write /etc/hostname, delete /etc/os-release>'");
    let status = Command::new(me)
        .args(["run", "--layer", "/", "--", "sh", "-c", SCRIPT])
        .status()
        .context("starting strata run")?;
    if !status.success() {
        bail!("the container failed: {status}");
    }
    let after = snapshot();
    for ((path, b), (_, a)) in before.iter().zip(&after) {
        if a != b {
            bail!("{path} changed on the host: the container was not isolated");
        }
        let first = a.as_deref().map(|d| {
            String::from_utf8_lossy(d)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        });
        match first {
            Some(line) => println!("host:    {path} is unchanged ({line:?})"),
            None => println!("host:    {path} is unchanged (absent)"),
        }
    }
    println!("The writable layer held the changes and was removed when the command exited.");
    Ok(())
}
