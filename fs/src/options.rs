//! The `stratafs` command line: fuse-overlayfs's syntax, parsed into a [`MountConfig`].
//!
//! `stratafs [-f] [-d] [-o OPT[,OPT]...]... [SOURCE] MOUNTPOINT`. Parsing only checks syntax;
//! whether the named directories exist and fit together is checked when the layers are opened
//! (see [`crate::layers`]).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

use crate::idmap::{parse_ranges, IdMaps, IdRange, IdTranslation};
use crate::upper::WhiteoutFormat;

/// A command-line problem, reported as one line and a non-zero exit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    /// No `lowerdir=` was given.
    #[error("no lowerdir= given: at least one lower layer is required")]
    NoLowerdir,
    /// `lowerdir=` naming no layer at all.
    #[error("lowerdir= names no layer: {0:?}")]
    EmptyLayer(String),
    /// A known option whose value does not parse.
    #[error("invalid value for option {name}: {value:?} ({why})")]
    BadValue {
        /// Option name.
        name: String,
        /// The value given.
        value: String,
        /// What was expected.
        why: &'static str,
    },
    /// An option that needs a value was given without one.
    #[error("option {0} needs a value ({0}=...)")]
    MissingValue(String),
    /// Only one of `upperdir=` and `workdir=` was given.
    #[error("{given} given without {missing}: both are needed for a writable layer")]
    UpperWorkPair {
        /// The option that was given.
        given: &'static str,
        /// The option that is missing.
        missing: &'static str,
    },
    /// Wrong number of positional arguments.
    #[error("{0}")]
    Usage(String),
}

/// Raw arguments as clap sees them.
#[derive(Parser, Debug)]
#[command(
    name = "stratafs",
    version,
    about = "A FUSE union filesystem with overlayfs semantics (fuse-overlayfs compatible)",
    after_help = "Overlay options: lowerdir=TOP:...:BOTTOM (\\: escapes a colon), upperdir=DIR, \
workdir=DIR, whiteout=auto|chardev|oci, squash_to_root, squash_to_uid=N, squash_to_gid=N, \
uidmapping=STORED:SHOWN:N[:...], gidmapping=..., xattr_permissions=0|1|2, volatile.\nMount options: allow_other, allow_root, default_permissions, ro, [no]suid, [no]dev, \
[no]exec, [no]atime, max_write=N, fsname=NAME, [no]passthrough.\nUnknown options are reported and ignored."
)]
struct RawArgs {
    /// Stay in the foreground instead of detaching.
    #[arg(short = 'f')]
    foreground: bool,
    /// Debug logging, in the foreground.
    #[arg(short = 'd')]
    debug: bool,
    /// Mount options, comma separated; may be repeated.
    #[arg(short = 'o', value_name = "OPTS", action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// `[SOURCE] MOUNTPOINT` (SOURCE is accepted for mount(8) and ignored).
    #[arg(value_name = "MOUNTPOINT", num_args = 1..=2, required = true)]
    positional: Vec<OsString>,
}

/// Options handed to the FUSE mount itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FuseOptions {
    /// `allow_other`: every user may access the mount.
    pub allow_other: bool,
    /// `allow_root`: the owner and root may access the mount.
    pub allow_root: bool,
    /// `ro`: mount read-only even with an upper layer.
    pub read_only: bool,
    /// `suid`/`nosuid`, when given.
    pub suid: Option<bool>,
    /// `dev`/`nodev`, when given.
    pub dev: Option<bool>,
    /// `exec`/`noexec`, when given.
    pub exec: Option<bool>,
    /// `atime`/`noatime`, when given.
    pub atime: Option<bool>,
    /// `max_write=N`.
    pub max_write: Option<u32>,
    /// `fsname=NAME` (shown as the mount source).
    pub fsname: Option<String>,
    /// `nopassthrough`: serve every read and write in the daemon, even where the kernel
    /// would let open files be read and written directly (FUSE passthrough, root only).
    pub no_passthrough: bool,
}

/// Everything the command line says about one mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountConfig {
    /// The SOURCE positional argument, if given (mount(8) passes one).
    pub source: Option<OsString>,
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// `-f`: do not detach.
    pub foreground: bool,
    /// `-d`: debug logging (implies foreground).
    pub debug: bool,
    /// Lower layers, highest first.
    pub lowerdirs: Vec<PathBuf>,
    /// The writable layer, if any.
    pub upperdir: Option<PathBuf>,
    /// Scratch directory for atomic copy-up, on the upper layer's filesystem.
    pub workdir: Option<PathBuf>,
    /// `whiteout=chardev|oci`: the whiteout format to write (default `auto`: char 0:0 when
    /// the upper filesystem allows it, else `.wh.NAME`).
    pub whiteout: Option<WhiteoutFormat>,
    /// `squash_to_uid=N` (or `squash_to_root`): every object is shown as owned by uid N.
    pub squash_uid: Option<u32>,
    /// `squash_to_gid=N` (or `squash_to_root`): every object is shown as owned by gid N.
    pub squash_gid: Option<u32>,
    /// `uidmapping=`: stored uids and the uids the mount shows for them.
    pub uid_ranges: Vec<IdRange>,
    /// `gidmapping=`: stored gids and the gids the mount shows for them.
    pub gid_ranges: Vec<IdRange>,
    /// `volatile` (or fuse-overlayfs's `fsync=0`): fsync is a no-op, as with the kernel's
    /// `volatile`; the upper layer is thrown away if the machine crashes.
    pub volatile: bool,
    /// `xattr_permissions=1|2`: owners and modes the filesystem cannot hold (rootless) are
    /// kept in an override xattr (`security.` or `user.` namespace); 0 turns it off.
    pub xattr_permissions: u8,
    /// Generic FUSE/mount options.
    pub fuse: FuseOptions,
    /// Options that were not understood; each is reported on stderr and ignored.
    pub unknown: Vec<String>,
}

/// Options accepted for compatibility that change nothing here: mount(8) generics, and
/// fuse-overlayfs tuning knobs whose job stratafs does on its own (`threaded`, `writeback`,
/// `fast_ino`, `static_nlink`, `noacl`, `timeout=`, `redirect_dir=`), and SELinux `context=`
/// (labels come from the mount's caller, not from us).
const ACCEPTED_AND_IGNORED: &[&str] = &[
    "context",
    "fscontext",
    "defcontext",
    "rootcontext",
    "threaded",
    "writeback",
    "fast_ino",
    "static_nlink",
    "noacl",
    "timeout",
    "redirect_dir",
    "rw",
    "defaults",
    "default_permissions",
    "async",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "nofail",
    "_netdev",
    "lazytime",
    "nolazytime",
    "relatime",
    "strictatime",
    "nodiratime",
    "diratime",
];

impl MountConfig {
    /// A configuration for library users that open a stack without a command line (so that
    /// no path needs escaping): layers highest first, an optional upper layer with its
    /// workdir, everything else at its default.
    pub fn for_layers(
        lowerdirs: Vec<PathBuf>,
        upper: Option<(PathBuf, PathBuf)>,
        mountpoint: PathBuf,
    ) -> MountConfig {
        let (upperdir, workdir) = upper.unzip();
        MountConfig {
            source: None,
            mountpoint,
            foreground: true,
            debug: false,
            lowerdirs,
            upperdir,
            workdir,
            whiteout: None,
            squash_uid: None,
            squash_gid: None,
            uid_ranges: Vec::new(),
            gid_ranges: Vec::new(),
            volatile: false,
            xattr_permissions: 0,
            fuse: FuseOptions::default(),
            unknown: Vec::new(),
        }
    }

    /// How stored owners are to be shown, from the mapping and squash options.
    pub fn id_maps(&self) -> IdMaps {
        IdMaps {
            uid: IdTranslation {
                ranges: self.uid_ranges.clone(),
                squash: self.squash_uid,
            },
            gid: IdTranslation {
                ranges: self.gid_ranges.clone(),
                squash: self.squash_gid,
            },
        }
    }

    /// Parses a full argument vector (including the program name). `--help` and `--version`
    /// come back as clap errors whose `exit` prints and exits 0.
    pub fn from_args<I, T>(args: I) -> Result<Result<MountConfig, OptionError>, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let raw = RawArgs::try_parse_from(args)?;
        Ok(Self::from_raw(raw))
    }

    fn from_raw(raw: RawArgs) -> Result<MountConfig, OptionError> {
        let mut positional = raw.positional;
        let mountpoint = PathBuf::from(
            positional
                .pop()
                .ok_or_else(|| OptionError::Usage("missing MOUNTPOINT".to_string()))?,
        );
        let source = positional.pop();
        let mut cfg = MountConfig {
            source,
            mountpoint,
            foreground: raw.foreground || raw.debug,
            debug: raw.debug,
            lowerdirs: Vec::new(),
            upperdir: None,
            workdir: None,
            whiteout: None,
            squash_uid: None,
            squash_gid: None,
            uid_ranges: Vec::new(),
            gid_ranges: Vec::new(),
            volatile: false,
            xattr_permissions: 0,
            fuse: FuseOptions::default(),
            unknown: Vec::new(),
        };
        let mut saw_lowerdir = false;
        for group in &raw.options {
            for opt in split_options(group) {
                if opt.is_empty() {
                    continue;
                }
                let (name, value) = match opt.split_once('=') {
                    Some((n, v)) => (n, Some(v)),
                    None => (opt.as_str(), None),
                };
                cfg.apply(name, value, &mut saw_lowerdir)?;
            }
        }
        if !saw_lowerdir {
            return Err(OptionError::NoLowerdir);
        }
        match (&cfg.upperdir, &cfg.workdir) {
            (Some(_), None) => {
                return Err(OptionError::UpperWorkPair {
                    given: "upperdir=",
                    missing: "workdir=",
                })
            }
            (None, Some(_)) => {
                return Err(OptionError::UpperWorkPair {
                    given: "workdir=",
                    missing: "upperdir=",
                })
            }
            _ => {}
        }
        Ok(cfg)
    }

    fn apply<'v>(
        &mut self,
        name: &str,
        value: Option<&'v str>,
        saw_lowerdir: &mut bool,
    ) -> Result<(), OptionError> {
        let need =
            |v: Option<&'v str>| v.ok_or_else(|| OptionError::MissingValue(name.to_string()));
        match name {
            "lowerdir" => {
                let v = need(value)?;
                self.lowerdirs = parse_lowerdir(v)?;
                *saw_lowerdir = true;
            }
            "upperdir" => self.upperdir = Some(nonempty_path(name, need(value)?)?),
            "workdir" => self.workdir = Some(nonempty_path(name, need(value)?)?),
            "whiteout" => {
                let v = need(value)?;
                self.whiteout = match v {
                    "auto" => None,
                    "chardev" => Some(WhiteoutFormat::CharDev),
                    "oci" => Some(WhiteoutFormat::Oci),
                    _ => {
                        return Err(OptionError::BadValue {
                            name: name.to_string(),
                            value: v.to_string(),
                            why: "expected auto, chardev or oci",
                        })
                    }
                };
            }
            "squash_to_root" => {
                self.squash_uid = Some(0);
                self.squash_gid = Some(0);
            }
            "squash_to_uid" => self.squash_uid = Some(parse_id(name, need(value)?)?),
            "uidmapping" => self.uid_ranges = parse_mapping(name, need(value)?)?,
            "gidmapping" => self.gid_ranges = parse_mapping(name, need(value)?)?,
            "volatile" => self.volatile = true,
            "fsync" => {
                let v = need(value)?;
                self.volatile = match v {
                    "0" => true,
                    "1" => false,
                    _ => {
                        return Err(OptionError::BadValue {
                            name: name.to_string(),
                            value: v.to_string(),
                            why: "expected 0 or 1",
                        })
                    }
                };
            }
            "xattr_permissions" => {
                let v = need(value)?;
                self.xattr_permissions = match v {
                    "0" => 0,
                    "1" => 1,
                    "2" => 2,
                    _ => {
                        return Err(OptionError::BadValue {
                            name: name.to_string(),
                            value: v.to_string(),
                            why: "expected 0, 1 or 2",
                        })
                    }
                };
            }
            "squash_to_gid" => self.squash_gid = Some(parse_id(name, need(value)?)?),
            "allow_other" => self.fuse.allow_other = true,
            "allow_root" => self.fuse.allow_root = true,
            "ro" => self.fuse.read_only = true,
            "suid" => self.fuse.suid = Some(true),
            "nosuid" => self.fuse.suid = Some(false),
            "dev" => self.fuse.dev = Some(true),
            "nodev" => self.fuse.dev = Some(false),
            "exec" => self.fuse.exec = Some(true),
            "noexec" => self.fuse.exec = Some(false),
            "atime" => self.fuse.atime = Some(true),
            "noatime" => self.fuse.atime = Some(false),
            "fsname" => self.fuse.fsname = Some(need(value)?.to_string()),
            "passthrough" => self.fuse.no_passthrough = false,
            "nopassthrough" => self.fuse.no_passthrough = true,
            "max_write" => {
                let v = need(value)?;
                let n: u32 = v.parse().map_err(|_| OptionError::BadValue {
                    name: name.to_string(),
                    value: v.to_string(),
                    why: "expected a positive number of bytes",
                })?;
                if n == 0 {
                    return Err(OptionError::BadValue {
                        name: name.to_string(),
                        value: v.to_string(),
                        why: "must be greater than zero",
                    });
                }
                self.fuse.max_write = Some(n);
            }
            n if ACCEPTED_AND_IGNORED.contains(&n) => {}
            // mount(8) passes helper-only options such as x-systemd.* through.
            n if n.starts_with("x-") => {}
            _ => self.unknown.push(match value {
                Some(v) => format!("{name}={v}"),
                None => name.to_string(),
            }),
        }
        Ok(())
    }
}

fn parse_mapping(name: &str, v: &str) -> Result<Vec<IdRange>, OptionError> {
    parse_ranges(v).map_err(|e| OptionError::BadValue {
        name: name.to_string(),
        value: v.to_string(),
        why: e.0,
    })
}

fn parse_id(name: &str, v: &str) -> Result<u32, OptionError> {
    v.parse().map_err(|_| OptionError::BadValue {
        name: name.to_string(),
        value: v.to_string(),
        why: "expected a numeric id",
    })
}

fn nonempty_path(name: &str, v: &str) -> Result<PathBuf, OptionError> {
    if v.is_empty() {
        return Err(OptionError::BadValue {
            name: name.to_string(),
            value: String::new(),
            why: "expected a directory path",
        });
    }
    Ok(PathBuf::from(v))
}

/// Splits one `-o` argument at commas. A backslash keeps the next character literally for
/// the layer list parser (`\:`), and `\,` keeps a comma inside a value. Commas inside double
/// quotes do not split either: SELinux contexts such as `context="...:s0:c1,c2"` carry them.
fn split_options(group: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = group.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if quoted => cur.push(c),
            '\\' => {
                cur.push('\\');
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ',' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Parses `TOP:...:BOTTOM`, where `\:` is a literal colon and `\\` a literal backslash.
/// Empty entries (`A::B`, a trailing colon) are skipped, as fuse-overlayfs does; a list with
/// no layer at all is an error.
fn parse_lowerdir(v: &str) -> Result<Vec<PathBuf>, OptionError> {
    let mut layers = Vec::new();
    let mut cur = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n) => cur.push(n),
                None => cur.push('\\'),
            },
            ':' => {
                if !cur.is_empty() {
                    layers.push(PathBuf::from(std::mem::take(&mut cur)));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        layers.push(PathBuf::from(cur));
    }
    if layers.is_empty() {
        return Err(OptionError::EmptyLayer(v.to_string()));
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<MountConfig, OptionError> {
        let mut v = vec!["stratafs"];
        v.extend_from_slice(args);
        MountConfig::from_args(v).expect("clap accepts")
    }

    #[test]
    fn whiteout_format_option() {
        let w = |v: &str| parse(&["-o", &format!("lowerdir=/a,whiteout={v}"), "/m"]);
        assert_eq!(w("oci").unwrap().whiteout, Some(WhiteoutFormat::Oci));
        assert_eq!(
            w("chardev").unwrap().whiteout,
            Some(WhiteoutFormat::CharDev)
        );
        assert_eq!(w("auto").unwrap().whiteout, None);
        assert!(matches!(w("xattr"), Err(OptionError::BadValue { .. })));
    }

    #[test]
    fn fuse_overlayfs_style_line() {
        let c = parse(&["-o", "lowerdir=/a:/b,upperdir=/u,workdir=/w", "/mnt"]).unwrap();
        assert_eq!(c.lowerdirs, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(c.upperdir, Some(PathBuf::from("/u")));
        assert_eq!(c.workdir, Some(PathBuf::from("/w")));
        assert_eq!(c.mountpoint, PathBuf::from("/mnt"));
        assert!(!c.foreground);
    }

    #[test]
    fn repeated_and_empty_entries_and_source() {
        let c = parse(&[
            "stratafs-src",
            "/mnt",
            "-o",
            "lowerdir=/a,,",
            "-o",
            ",allow_other,max_write=131072,nodev",
            "-f",
        ])
        .unwrap();
        assert_eq!(c.source, Some(OsString::from("stratafs-src")));
        assert!(c.fuse.allow_other);
        assert_eq!(c.fuse.max_write, Some(131072));
        assert_eq!(c.fuse.dev, Some(false));
        assert!(c.foreground);
        assert!(c.unknown.is_empty());
    }

    #[test]
    fn escaped_colon_in_layer_path() {
        let c = parse(&["-o", r"lowerdir=/x\:y:/z", "/m"]).unwrap();
        assert_eq!(
            c.lowerdirs,
            vec![PathBuf::from("/x:y"), PathBuf::from("/z")]
        );
    }

    #[test]
    fn attached_o_value() {
        let c = parse(&["-olowerdir=/a", "/m"]).unwrap();
        assert_eq!(c.lowerdirs, vec![PathBuf::from("/a")]);
    }

    #[test]
    fn unknown_options_are_collected() {
        let c = parse(&["-o", "lowerdir=/a,frobnicate,color=blue", "/m"]).unwrap();
        assert_eq!(c.unknown, vec!["frobnicate", "color=blue"]);
    }

    #[test]
    fn containers_storage_line() {
        // As Podman writes it for --userns=keep-id: an empty entry, volatile, mappings with a
        // leading colon, and an empty layer in the list.
        let c = parse(&[
            "-o",
            "lowerdir=/l/A::/l/B:,upperdir=/u,workdir=/w,,volatile,context=\"system_u:object_r:container_file_t:s0:c1,c2\",uidmapping=:0:1:1001:1001:0:1,gidmapping=:0:1:1001,xattr_permissions=2",
            "/m",
        ])
        .unwrap();
        assert_eq!(
            c.lowerdirs,
            vec![PathBuf::from("/l/A"), PathBuf::from("/l/B")]
        );
        assert!(c.volatile);
        assert_eq!(c.uid_ranges.len(), 2);
        assert_eq!(c.gid_ranges.len(), 1);
        assert_eq!(c.xattr_permissions, 2);
        assert!(c.unknown.is_empty(), "{:?}", c.unknown);
    }

    #[test]
    fn errors() {
        assert_eq!(parse(&["/m"]), Err(OptionError::NoLowerdir));
        assert!(matches!(
            parse(&["-o", "lowerdir=", "/m"]),
            Err(OptionError::EmptyLayer(_))
        ));
        assert!(matches!(
            parse(&["-o", "lowerdir=::", "/m"]),
            Err(OptionError::EmptyLayer(_))
        ));
        assert!(matches!(
            parse(&["-o", "lowerdir=/a,uidmapping=0:1", "/m"]),
            Err(OptionError::BadValue { .. })
        ));
        assert!(matches!(
            parse(&["-o", "lowerdir=/a,xattr_permissions=3", "/m"]),
            Err(OptionError::BadValue { .. })
        ));
        assert!(matches!(
            parse(&["-o", "lowerdir=/a,max_write=abc", "/m"]),
            Err(OptionError::BadValue { .. })
        ));
        assert!(matches!(
            parse(&["-o", "lowerdir=/a,upperdir=/u", "/m"]),
            Err(OptionError::UpperWorkPair { .. })
        ));
        assert!(matches!(
            parse(&["-o", "lowerdir=/a,workdir=/w", "/m"]),
            Err(OptionError::UpperWorkPair { .. })
        ));
        assert!(matches!(
            parse(&["-o", "lowerdir", "/m"]),
            Err(OptionError::MissingValue(_))
        ));
    }

    #[test]
    fn help_and_version_are_clap_exits() {
        let e = MountConfig::from_args(["stratafs", "--version"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
        let e = MountConfig::from_args(["stratafs", "--help"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
    }
}
