//! Builds the merged listing of a directory from its layers' copies.
//!
//! One `getdents64` pass per layer, top first. A name is listed once, from the highest layer
//! that has it; whiteouts hide names of the layers below their own. Whiteouts are recognised
//! from the listing itself (`.wh.` names, `DT_CHR` entries checked with one `fstatat`), so a
//! listing costs no per-entry syscall in the common case. The rules match [`crate::overlay`]'s
//! lookup exactly, so that lookup and readdir always agree.

use std::collections::HashSet;
use std::os::fd::BorrowedFd;

use crate::fasthash::BuildFoldHasher;
use crate::fdcache::LayerDir;
use crate::inode::{DirLayer, InoMapper};
use crate::sys::{self, SysResult};
use crate::whiteout;

/// One entry of a merged listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// Entry name.
    pub name: Box<[u8]>,
    /// Our inode number for it.
    pub ino: u64,
    /// File type bits (`S_IFMT` part of the mode).
    pub kind: u32,
    /// Its position cookie ([`cookie`]; 0 until [`order`] sets it).
    pub off: u64,
}

/// The position cookie of `name` in any listing of its directory: a hash of the name, so
/// that a reader that goes on from an entry (or seeks to it) goes on from the same place in
/// the listing as it is now, whatever came or went before it. 1 and 2 are "." and "..";
/// cookies are positive `loff_t` values.
pub fn cookie(name: &[u8]) -> u64 {
    match name {
        b"." => 1,
        b".." => 2,
        _ => {
            // FNV-1a, then a final mix so that similar names spread.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for &b in name {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            h ^= h >> 33;
            h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
            h ^= h >> 33;
            3 + h % (i64::MAX as u64 - 3)
        }
    }
}

/// Gives `entries` their cookies and sorts them by cookie, so that a read from cookie `c`
/// on is the entries after the first whose cookie is greater than `c`. The rare names
/// whose cookies collide get the next free value.
pub fn order(entries: &mut [DirEntry]) {
    for e in entries.iter_mut() {
        e.off = cookie(&e.name);
    }
    entries.sort_unstable_by(|a, b| (a.off, &a.name).cmp(&(b.off, &b.name)));
    for i in 1..entries.len() {
        if entries[i].off <= entries[i - 1].off {
            entries[i].off = entries[i - 1].off + 1;
        }
    }
}

/// Merges the listings of `layers` (top first). `open` gives the descriptor of a layer's copy
/// of the directory and that layer's device number.
pub fn merge<F>(layers: &[DirLayer], mut open: F, inos: &InoMapper) -> SysResult<Vec<DirEntry>>
where
    F: FnMut(&DirLayer) -> SysResult<(std::sync::Arc<LayerDir>, u64)>,
{
    let mut out: Vec<DirEntry> = Vec::new();
    // Names listed from a higher layer or whited out in one: either way a lower layer's
    // entry of that name is not listed. One set, so a bottom-layer entry costs one probe.
    let mut taken: NameSet = NameSet::default();
    for (i, dl) in layers.iter().enumerate() {
        let (fd, dev) = match open(dl) {
            Ok(x) => x,
            Err(libc::ENOENT) | Err(libc::ENOTDIR) => continue,
            Err(e) => return Err(e),
        };
        // Names of the bottom layer need not be remembered: no layer below can repeat them.
        let last = i + 1 == layers.len();
        let number = inos.for_dev(dev);
        let dir = std::os::fd::AsFd::as_fd(fd.as_ref());
        let raw = if fd.wants_names() {
            let (raw, casefold) = sys::read_dir_casefold(dir)?;
            if !casefold {
                fd.listed(raw.iter().map(|e| &e.name[..]));
            }
            raw
        } else {
            sys::read_dir(dir)?
        };
        out.reserve(raw.len());
        let mut whiteouts: Vec<Box<[u8]>> = Vec::new();
        for e in raw {
            if e.name.as_ref() == whiteout::OCI_OPAQUE {
                continue;
            }
            if let Some(target) = e.name.strip_prefix(whiteout::OCI_PREFIX) {
                whiteouts.push(target.into());
                continue;
            }
            if !taken.is_empty() && taken.contains(&e.name) {
                continue;
            }
            let Some(kind) = entry_kind(dir, &e, dl.xattr_whiteouts)? else {
                whiteouts.push(e.name.clone());
                continue;
            };
            if !last {
                taken.insert(e.name.clone());
            }
            out.push(DirEntry {
                ino: number(e.ino),
                name: e.name,
                kind,
                off: 0,
            });
        }
        // Only after the layer: a whiteout hides the layers below its own.
        taken.extend(whiteouts);
    }
    Ok(out)
}

/// Names already listed or hidden, by the daemon's fast hasher.
type NameSet = HashSet<Box<[u8]>, BuildFoldHasher>;

/// The entry's file type, or `None` when the entry is a whiteout.
fn entry_kind(
    dir: BorrowedFd<'_>,
    e: &sys::RawDirEntry,
    xattr_whiteouts: bool,
) -> SysResult<Option<u32>> {
    let by_dtype = match e.d_type {
        libc::DT_DIR => Some(libc::S_IFDIR),
        libc::DT_LNK => Some(libc::S_IFLNK),
        libc::DT_FIFO => Some(libc::S_IFIFO),
        libc::DT_SOCK => Some(libc::S_IFSOCK),
        libc::DT_BLK => Some(libc::S_IFBLK),
        libc::DT_REG if !xattr_whiteouts => Some(libc::S_IFREG),
        _ => None, // DT_CHR, DT_UNKNOWN, or a file that may be an xattr whiteout
    };
    if let Some(k) = by_dtype {
        return Ok(Some(k));
    }
    let name = sys::cstring(&e.name)?;
    let st = match sys::stat_at(dir, &name) {
        Ok(st) => st,
        // Vanished between getdents and stat: leave it out, as lookup would.
        Err(libc::ENOENT) => return Ok(None),
        Err(err) => return Err(err),
    };
    if whiteout::is_chardev_whiteout(&st) {
        return Ok(None);
    }
    if xattr_whiteouts
        && whiteout::may_be_xattr_whiteout(&st)
        && whiteout::has_whiteout_xattr(dir, &name)
    {
        return Ok(None);
    }
    Ok(Some(st.st_mode & libc::S_IFMT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> DirEntry {
        DirEntry {
            name: Box::from(name.as_bytes()),
            ino: 1,
            kind: libc::S_IFREG,
            off: 0,
        }
    }

    #[test]
    fn cookies_order_a_listing_the_same_way_whatever_else_is_in_it() {
        let names = ["..", "b", ".", "a", "zz", "x0", "x1"];
        let mut all: Vec<DirEntry> = names.iter().map(|n| entry(n)).collect();
        order(&mut all);
        assert_eq!(&*all[0].name, b".");
        assert_eq!(all[0].off, 1);
        assert_eq!(&*all[1].name, b"..");
        assert_eq!(all[1].off, 2);
        assert!(all.windows(2).all(|w| w[0].off < w[1].off));
        assert!(all.iter().all(|e| e.off <= i64::MAX as u64));
        // Without some names, the others keep their cookies and their order.
        let mut some: Vec<DirEntry> = ["a", "zz", ".", "x1"].iter().map(|n| entry(n)).collect();
        order(&mut some);
        for e in &some {
            let same = all.iter().find(|a| a.name == e.name).unwrap();
            assert_eq!(e.off, same.off, "{:?}", String::from_utf8_lossy(&e.name));
        }
    }
}
