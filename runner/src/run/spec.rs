//! What `strata run` was asked for, checked before anything is created: layers, volumes,
//! environment, user, network.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Command line of `strata run`.
#[derive(clap::Args, Debug)]
#[command(trailing_var_arg = true)]
pub struct RunArgs {
    /// A read-only layer directory; repeat for a stack, highest first (the order of
    /// stratafs's lowerdir=TOP:...:BOTTOM).
    #[arg(long = "layer", value_name = "DIR", required = true)]
    pub layers: Vec<PathBuf>,
    /// Keep the writable layer in DIR (DIR/diff, with its workdir DIR/work) so that a later
    /// run can reuse it; without it the writable layer is thrown away at exit.
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// Bind-mount HOST (a file or directory) at CTR in the container; `:ro` makes it
    /// read-only.
    #[arg(short = 'v', long = "volume", value_name = "HOST:CTR[:ro]")]
    pub volumes: Vec<String>,
    /// Set an environment variable (KEY alone copies it from the caller).
    #[arg(short = 'e', long = "env", value_name = "KEY=VAL")]
    pub env: Vec<String>,
    /// Working directory of the command in the container (default /).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// Run the command as UID (and GID) in the container.
    #[arg(short = 'u', long = "user", value_name = "UID[:GID]")]
    pub user: Option<String>,
    /// Host name in the container.
    #[arg(long, default_value = "strata")]
    pub hostname: String,
    /// `none` (own network namespace with loopback up) or `host`.
    #[arg(long, value_name = "MODE", default_value = "none")]
    pub network: String,
    /// Mount the container's root filesystem read-only.
    #[arg(long = "read-only")]
    pub read_only: bool,
    /// The command and its arguments.
    #[arg(required = true, value_name = "CMD", num_args = 1..)]
    pub command: Vec<OsString>,
}

/// A bind mount from the host into the container.
#[derive(Debug, Clone)]
pub struct Volume {
    /// Host path (absolute).
    pub host: PathBuf,
    /// Path in the container (absolute).
    pub ctr: PathBuf,
    /// Read-only bind.
    pub read_only: bool,
}

/// The user the command runs as.
#[derive(Debug, Clone, Copy)]
pub struct User {
    /// Numeric uid in the container.
    pub uid: u32,
    /// Numeric gid, when given.
    pub gid: Option<u32>,
}

/// A checked `strata run` request.
#[derive(Debug)]
pub struct Spec {
    /// Read-only layers, highest first.
    pub layers: Vec<PathBuf>,
    /// Persistent container directory, if any.
    pub upper: Option<PathBuf>,
    /// Bind mounts.
    pub volumes: Vec<Volume>,
    /// The command's environment.
    pub env: Vec<(String, String)>,
    /// Working directory in the container.
    pub workdir: String,
    /// Who runs the command.
    pub user: Option<User>,
    /// Host name.
    pub hostname: String,
    /// Share the host's network namespace.
    pub host_network: bool,
    /// Read-only root filesystem.
    pub read_only: bool,
    /// The command.
    pub command: Vec<OsString>,
}

impl Spec {
    /// Checks `args`; every problem is one line naming what is wrong.
    pub fn from_args(args: RunArgs) -> Result<Spec> {
        let mut layers = Vec::new();
        for l in &args.layers {
            let md = std::fs::metadata(l).with_context(|| format!("layer {}", l.display()))?;
            if !md.is_dir() {
                bail!("layer {} is not a directory", l.display());
            }
            layers.push(std::path::absolute(l).with_context(|| format!("layer {}", l.display()))?);
        }
        let upper = match &args.upper {
            Some(u) => {
                Some(std::path::absolute(u).with_context(|| format!("--upper {}", u.display()))?)
            }
            None => None,
        };
        let volumes = args
            .volumes
            .iter()
            .map(|v| parse_volume(v))
            .collect::<Result<Vec<_>>>()?;
        let host_network = match args.network.as_str() {
            "none" => false,
            "host" => true,
            other => bail!("--network {other:?}: expected none or host"),
        };
        let user = args.user.as_deref().map(parse_user).transpose()?;
        let workdir = args.workdir.unwrap_or_else(|| "/".to_string());
        if !workdir.starts_with('/') {
            bail!("--workdir {workdir:?}: must be an absolute path in the container");
        }
        if args.hostname.is_empty() || args.hostname.len() > 64 {
            bail!("--hostname {:?}: must be 1 to 64 characters", args.hostname);
        }
        let env = build_env(&args.env, user.map_or(0, |u| u.uid), &args.hostname)?;
        Ok(Spec {
            layers,
            upper,
            volumes,
            env,
            workdir,
            user,
            hostname: args.hostname,
            host_network,
            read_only: args.read_only,
            command: args.command,
        })
    }
}

/// `HOST:CTR[:ro|:rw]`.
fn parse_volume(spec: &str) -> Result<Volume> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (host, ctr, read_only) = match parts.as_slice() {
        [h, c] => (*h, *c, false),
        [h, c, "ro"] => (*h, *c, true),
        [h, c, "rw"] => (*h, *c, false),
        [_, _, o] => bail!("volume {spec:?}: unknown option {o:?} (expected ro or rw)"),
        _ => bail!("volume {spec:?}: expected HOST:CTR[:ro]"),
    };
    if host.is_empty() || ctr.is_empty() {
        bail!("volume {spec:?}: expected HOST:CTR[:ro]");
    }
    if !ctr.starts_with('/') || ctr.split('/').any(|c| c == "..") {
        bail!("volume {spec:?}: the container path must be absolute, without ..");
    }
    let host = Path::new(host);
    std::fs::metadata(host)
        .with_context(|| format!("volume {spec:?}: host path {}", host.display()))?;
    Ok(Volume {
        host: std::path::absolute(host)?,
        ctr: PathBuf::from(ctr),
        read_only,
    })
}

/// `UID[:GID]`, numeric.
fn parse_user(s: &str) -> Result<User> {
    let num = |v: &str| -> Result<u32> {
        v.parse()
            .with_context(|| format!("--user {s:?}: expected numeric UID[:GID]"))
    };
    Ok(match s.split_once(':') {
        Some((u, g)) => User {
            uid: num(u)?,
            gid: Some(num(g)?),
        },
        None => User {
            uid: num(s)?,
            gid: None,
        },
    })
}

/// A container's environment: a small default (as Podman gives), then `-e` items in order.
fn build_env(items: &[String], uid: u32, hostname: &str) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), if uid == 0 { "/root" } else { "/" }.into()),
        ("HOSTNAME".into(), hostname.into()),
        ("container".into(), "strata".into()),
    ];
    if let Ok(term) = std::env::var("TERM") {
        env.push(("TERM".into(), term));
    }
    for item in items {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match std::env::var(item) {
                Ok(v) => (item.clone(), v),
                Err(_) => continue,
            },
        };
        if k.is_empty() || k.contains('\0') || v.contains('\0') {
            bail!("-e {item:?}: expected KEY=VALUE");
        }
        env.retain(|(old, _)| *old != k);
        env.push((k, v));
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes() {
        let v = parse_volume("/tmp:/data:ro").unwrap();
        assert!(v.read_only);
        assert_eq!(v.ctr, PathBuf::from("/data"));
        assert!(parse_volume("/tmp").is_err());
        assert!(parse_volume("/tmp:data").is_err());
        assert!(parse_volume("/tmp:/d:xx").is_err());
        assert!(parse_volume("/does/not/exist:/d").is_err());
    }

    #[test]
    fn users_and_env() {
        assert_eq!(parse_user("5:6").unwrap().gid, Some(6));
        assert!(parse_user("bob").is_err());
        let env = build_env(&["A=1".into(), "PATH=/x".into()], 0, "h").unwrap();
        assert!(env.contains(&("A".into(), "1".into())));
        assert_eq!(env.iter().filter(|(k, _)| k == "PATH").count(), 1);
    }
}
