//! Lower hard links modified through one name: the workdir's index holds the shared upper
//! copy under the lower file's identity, and every other lower name of that file shows the
//! copy through the overlay. Here the index entries are read (stratafs and kernel naming) and
//! the lower layers scanned for the names of each indexed file.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use strata_fs::sys;

use super::upper::{cstring, join, open_dir};
use super::view::os_err;

/// How an index entry names the lower file it is the copy of.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LowerKey {
    /// stratafs: `{dev:x}-{ino:x}` of the lower file.
    Strata { dev: u64, ino: u64 },
    /// kernel overlayfs: the hex of its `ovl_fb` file handle; we keep the handle type and
    /// the filesystem's part of the handle, which `name_to_handle_at` gives for a lower file.
    Kernel { handle_type: i32, fid: Vec<u8> },
}

/// One lower name of an indexed file.
#[derive(Debug, Clone)]
pub(super) struct LowerName {
    /// Path in its layer (no leading slash).
    pub path: Vec<u8>,
    /// The lower file's real identity.
    pub dev: u64,
    /// The lower file's real inode number.
    pub ino: u64,
}

/// One index entry: the upper copy of a lower hard link.
#[derive(Debug)]
pub(super) struct IndexEntry {
    /// Its name in the index directory.
    pub name: CString,
    /// The real identity of the upper copy (also of every upper name linked to it).
    pub upper_id: (u64, u64),
    key: LowerKey,
    /// The lower names found by [`Index::scan`], each layer's, sorted by path.
    pub names: Vec<LowerName>,
}

/// The workdir's index.
pub(super) struct Index {
    /// `O_PATH` descriptor of `work/index`, when there is one.
    pub dir: Option<OwnedFd>,
    /// The entries for regular files (other entries, such as the kernel's shared
    /// whiteouts, say nothing about lower hard links).
    pub entries: Vec<IndexEntry>,
}

impl Index {
    /// Reads `workdir/index`; no such directory is an empty index.
    pub fn load(workdir: &Path) -> Result<Index> {
        let path = workdir.join("index");
        let dir = match std::fs::File::open(&path) {
            Ok(f) => OwnedFd::from(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Index {
                    dir: None,
                    entries: Vec::new(),
                })
            }
            Err(e) => return Err(e).with_context(|| format!("index {}", path.display())),
        };
        let mut entries = Vec::new();
        let listing = sys::read_dir(dir.as_fd()).map_err(os_err);
        for e in listing.with_context(|| format!("listing {}", path.display()))? {
            let Some(key) = parse_name(&e.name) else {
                continue;
            };
            let name = cstring(&e.name)?;
            let st = sys::stat_at(dir.as_fd(), &name).map_err(os_err)?;
            if st.st_mode & libc::S_IFMT == libc::S_IFREG {
                entries.push(IndexEntry {
                    name,
                    upper_id: (st.st_dev, st.st_ino),
                    key,
                    names: Vec::new(),
                });
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Index {
            dir: Some(dir),
            entries,
        })
    }

    /// Finds, in every lower layer, the names of the files the entries are copies of.
    pub fn scan(&mut self, layers: &[PathBuf]) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        for layer in layers {
            let root = open_dir_path(layer)?;
            self.scan_dir(root.as_fd(), b"")
                .with_context(|| format!("scanning layer {} for hard links", layer.display()))?;
        }
        for e in &mut self.entries {
            e.names.sort_by(|a, b| a.path.cmp(&b.path));
        }
        Ok(())
    }

    fn scan_dir(&mut self, dir: BorrowedFd<'_>, path: &[u8]) -> Result<()> {
        for e in sys::read_dir(dir).map_err(os_err)? {
            let name = cstring(&e.name)?;
            let st = sys::stat_at(dir, &name).map_err(os_err)?;
            let child = join(path, &e.name);
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => {
                    let fd = open_dir(dir, &e.name)?;
                    self.scan_dir(fd.as_fd(), &child)?;
                }
                libc::S_IFREG if st.st_nlink > 1 => self.match_file(dir, &name, &st, child),
                _ => {}
            }
        }
        Ok(())
    }

    /// Records `path` as a lower name of the entry it is the original of, if any.
    fn match_file(&mut self, dir: BorrowedFd<'_>, name: &CString, st: &libc::stat, path: Vec<u8>) {
        let mut handle = None;
        for entry in &mut self.entries {
            let hit = match &entry.key {
                LowerKey::Strata { dev, ino } => (*dev, *ino) == (st.st_dev, st.st_ino),
                LowerKey::Kernel { handle_type, fid } => {
                    let h = handle.get_or_insert_with(|| file_handle(dir, name));
                    h.as_ref()
                        .is_some_and(|(t, f)| t == handle_type && f == fid)
                }
            };
            if hit {
                entry.names.push(LowerName {
                    path,
                    dev: st.st_dev,
                    ino: st.st_ino,
                });
                return;
            }
        }
    }
}

/// The lower file an index entry name stands for, or `None` for other entries.
fn parse_name(name: &[u8]) -> Option<LowerKey> {
    let s = std::str::from_utf8(name).ok()?;
    if let Some((dev, ino)) = s.split_once('-') {
        return Some(LowerKey::Strata {
            dev: u64::from_str_radix(dev, 16).ok()?,
            ino: u64::from_str_radix(ino, 16).ok()?,
        });
    }
    // struct ovl_fb: version, magic 0xfb, len, flags, type, uuid[16], fid[].
    let fb = hex(s)?;
    if fb.len() < 21 || fb[1] != 0xfb || fb[2] as usize != fb.len() {
        return None;
    }
    Some(LowerKey::Kernel {
        handle_type: fb[4] as i32,
        fid: fb[21..].to_vec(),
    })
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `name_to_handle_at` of `name` in `dir`: the handle type and bytes.
fn file_handle(dir: BorrowedFd<'_>, name: &CString) -> Option<(i32, Vec<u8>)> {
    /// `struct file_handle` with room for the largest handle (`MAX_HANDLE_SZ`).
    #[repr(C)]
    struct FileHandle {
        handle_bytes: u32,
        handle_type: i32,
        f_handle: [u8; 128],
    }
    let mut fh = FileHandle {
        handle_bytes: 128,
        handle_type: 0,
        f_handle: [0; 128],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: valid descriptor, C string and buffers for the call's duration.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut fh as *mut FileHandle,
            &mut mount_id as *mut libc::c_int,
            0,
        )
    };
    let len = (fh.handle_bytes as usize).min(fh.f_handle.len());
    (r == 0).then(|| (fh.handle_type, fh.f_handle[..len].to_vec()))
}

fn open_dir_path(path: &Path) -> Result<OwnedFd> {
    let f = std::fs::File::open(path).with_context(|| format!("layer {}", path.display()))?;
    Ok(OwnedFd::from(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            parse_name(b"803-1f"),
            Some(LowerKey::Strata {
                dev: 0x803,
                ino: 0x1f
            })
        );
        let k = parse_name(b"00fb1d0001000000000000000000000000000000002141a0002e67b999");
        assert_eq!(
            k,
            Some(LowerKey::Kernel {
                handle_type: 1,
                fid: vec![0x21, 0x41, 0xa0, 0x00, 0x2e, 0x67, 0xb9, 0x99],
            })
        );
        assert_eq!(parse_name(b"#91fd"), None);
    }
}
