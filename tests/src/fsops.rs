//! Thin libc wrappers for what std does not offer: xattrs, raw readdir with `d_type`,
//! mmap, errno checks.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// `lgetxattr(path, name)`.
pub fn lgetxattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let p = cpath(path);
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    let r = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// `llistxattr(path)`, names in the order returned.
pub fn llistxattr(path: &Path) -> io::Result<Vec<String>> {
    let p = cpath(path);
    let mut buf = vec![0u8; 65536];
    let r =
        unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

/// `lsetxattr(path, name, value, 0)`.
pub fn lsetxattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let p = cpath(path);
    let n = CString::new(name).unwrap();
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `lremovexattr(path, name)`.
pub fn lremovexattr(path: &Path, name: &str) -> io::Result<()> {
    let p = cpath(path);
    let n = CString::new(name).unwrap();
    let r = unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The errno of an io result (`None` when it succeeded or carries no errno).
pub fn errno<T>(r: &io::Result<T>) -> Option<i32> {
    r.as_ref().err().and_then(|e| e.raw_os_error())
}

/// Name of an errno value, for messages.
pub fn errno_name(e: i32) -> String {
    format!(
        "{:?} ({})",
        nix::errno::Errno::from_raw(e),
        io::Error::from_raw_os_error(e)
    )
}

/// Asserts that `r` failed with `want` (an errno such as `libc::EROFS`).
pub fn assert_errno<T: std::fmt::Debug>(r: io::Result<T>, want: i32, what: &str) {
    match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected {}", errno_name(want)),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(want),
            "{what}: got {e}, expected {}",
            errno_name(want)
        ),
    }
}

/// Asserts that `lstat(path)` fails with ENOENT (or ENOTDIR when a parent is not a
/// directory): the name is hidden.
pub fn assert_absent(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(m) => panic!(
            "{} should not exist, but lstat found a {:?} (ino {})",
            path.display(),
            m.file_type(),
            m.ino()
        ),
        Err(e) => assert!(
            matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)),
            "lstat {}: expected ENOENT, got {e}",
            path.display()
        ),
    }
}

/// Kind of a directory entry or inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Character device.
    CharDev,
    /// Block device.
    BlockDev,
    /// Unix socket.
    Socket,
    /// `DT_UNKNOWN` from readdir.
    Unknown,
}

impl Kind {
    /// From an `st_mode`.
    pub fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            libc::S_IFSOCK => Kind::Socket,
            _ => Kind::Unknown,
        }
    }

    /// From a `d_type`.
    pub fn from_dtype(t: u8) -> Kind {
        match t {
            libc::DT_REG => Kind::File,
            libc::DT_DIR => Kind::Dir,
            libc::DT_LNK => Kind::Symlink,
            libc::DT_FIFO => Kind::Fifo,
            libc::DT_CHR => Kind::CharDev,
            libc::DT_BLK => Kind::BlockDev,
            libc::DT_SOCK => Kind::Socket,
            _ => Kind::Unknown,
        }
    }
}

/// One raw `readdir(3)` record.
#[derive(Debug, Clone)]
pub struct RawDirent {
    /// Entry name.
    pub name: String,
    /// Its `d_type`.
    pub kind: Kind,
    /// Its `d_ino`.
    pub ino: u64,
    /// `telldir()` right after this entry was returned (position of the next one).
    pub pos_after: i64,
}

/// An open `DIR*` (libc `opendir`), closed on drop.
pub struct DirStream {
    dir: *mut libc::DIR,
}

impl DirStream {
    /// `opendir(path)`.
    pub fn open(path: &Path) -> io::Result<Self> {
        let p = cpath(path);
        let dir = unsafe { libc::opendir(p.as_ptr()) };
        if dir.is_null() {
            Err(io::Error::last_os_error())
        } else {
            Ok(DirStream { dir })
        }
    }

    /// `readdir()`; `Ok(None)` at the end.
    pub fn next_entry(&mut self) -> io::Result<Option<RawDirent>> {
        unsafe {
            *libc::__errno_location() = 0;
            let d = libc::readdir(self.dir);
            if d.is_null() {
                let e = *libc::__errno_location();
                return if e == 0 {
                    Ok(None)
                } else {
                    Err(io::Error::from_raw_os_error(e))
                };
            }
            let name = std::ffi::CStr::from_ptr((*d).d_name.as_ptr())
                .to_string_lossy()
                .into_owned();
            let kind = Kind::from_dtype((*d).d_type);
            let ino = (*d).d_ino;
            let pos_after = libc::telldir(self.dir) as i64;
            Ok(Some(RawDirent {
                name,
                kind,
                ino,
                pos_after,
            }))
        }
    }

    /// `telldir()`.
    pub fn tell(&mut self) -> i64 {
        unsafe { libc::telldir(self.dir) as i64 }
    }

    /// `seekdir(pos)`.
    pub fn seek(&mut self, pos: i64) {
        unsafe { libc::seekdir(self.dir, pos as libc::c_long) }
    }

    /// `rewinddir()`.
    pub fn rewind(&mut self) {
        unsafe { libc::rewinddir(self.dir) }
    }
}

impl Drop for DirStream {
    fn drop(&mut self) {
        unsafe {
            libc::closedir(self.dir);
        }
    }
}

// The DIR* is only used from one thread at a time.
unsafe impl Send for DirStream {}

/// All entries of a directory except `.` and `..`, via libc readdir, with `d_type`.
pub fn read_dir_raw(path: &Path) -> io::Result<Vec<RawDirent>> {
    let mut d = DirStream::open(path)?;
    let mut v = Vec::new();
    while let Some(e) = d.next_entry()? {
        if e.name != "." && e.name != ".." {
            v.push(e);
        }
    }
    Ok(v)
}

/// Sorted entry names of a directory (std `read_dir`).
pub fn names(path: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(path)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", path.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Maps `len` bytes of `f` from offset 0, read-only, with `flags` (`MAP_PRIVATE` or
/// `MAP_SHARED`).
fn map_file(f: &fs::File, len: usize, flags: i32) -> io::Result<*mut libc::c_void> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a fresh mapping of an open file; the caller unmaps it.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            flags,
            f.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(ptr)
}

/// Reads a whole file through `mmap(PROT_READ, MAP_PRIVATE)`.
pub fn read_via_mmap(path: &Path) -> io::Result<Vec<u8>> {
    let f = fs::File::open(path)?;
    let len = f.metadata()?.len() as usize;
    if len == 0 {
        return Ok(Vec::new());
    }
    let p = map_file(&f, len, libc::MAP_PRIVATE)?;
    // SAFETY: the mapping is live and `len` long until the munmap.
    unsafe {
        let v = std::slice::from_raw_parts(p as *const u8, len).to_vec();
        libc::munmap(p, len);
        Ok(v)
    }
}

/// A read-only `MAP_SHARED` mapping of the first `len` bytes of an open file, kept until
/// dropped: it shows what the page cache holds at each look.
pub struct SharedMapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl SharedMapping {
    /// Maps `len` bytes of `f` from offset 0.
    pub fn new(f: &fs::File, len: usize) -> io::Result<SharedMapping> {
        let ptr = map_file(f, len, libc::MAP_SHARED)?;
        Ok(SharedMapping { ptr, len })
    }

    /// The mapped bytes as they are now.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is live and `len` long; callers do not shrink the file meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps what `new` mapped.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// `access(path, mode)`.
pub fn access(path: &Path, mode: i32) -> io::Result<()> {
    let p = cpath(path);
    if unsafe { libc::access(p.as_ptr(), mode) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `statvfs(path)`.
pub fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let p = cpath(path);
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(p.as_ptr(), &mut s) } == 0 {
        Ok(s)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `open(path, flags, 0644)` returning the raw result (fd closed on success).
pub fn open_raw(path: &Path, flags: i32) -> io::Result<()> {
    let p = cpath(path);
    let fd = unsafe { libc::open(p.as_ptr(), flags, 0o644 as libc::c_uint) };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        unsafe { libc::close(fd) };
        Ok(())
    }
}

/// Whether every page of file `path` is in the page cache (`mincore` on a mapping, which,
/// unlike a read, brings nothing in).
pub fn page_cached(path: &Path) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(path)?;
    let len = f.metadata()?.len() as usize;
    if len == 0 {
        return Ok(true);
    }
    // SAFETY: a private read-only mapping of our own descriptor, unmapped below; nothing
    // reads through it.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let page = 4096;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `vec` has one byte per page of the mapping.
    let r = unsafe { libc::mincore(map, len, vec.as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(map, len) };
    if r != 0 {
        return Err(err);
    }
    Ok(vec.iter().all(|&b| b & 1 == 1))
}

/// Held by a test that looks at what the page cache holds, so that no other test of its
/// binary drops the caches meanwhile (see [`hold_page_cache`]).
static PAGE_CACHE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Keeps the other tests of this binary from dropping the caches while the guard lives.
pub fn hold_page_cache() -> std::sync::MutexGuard<'static, ()> {
    PAGE_CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes file `path`'s pages out of the page cache (written back first).
pub fn evict(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(path)?;
    f.sync_data()?;
    // SAFETY: an advice on our own descriptor.
    match unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Writes `v` to `/proc/sys/vm/drop_caches` (2 = dentries and inodes), after `sync`; waits
/// while another test holds the page cache ([`hold_page_cache`]).
pub fn drop_caches(v: u8) {
    let _held = hold_page_cache();
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", format!("{v}\n")).expect("write drop_caches (root?)");
}

/// Raw `lgetxattr` into a buffer of `size` bytes (0 asks for the value's length); returns
/// the syscall's result.
pub fn lgetxattr_sized(path: &Path, name: &str, size: usize) -> io::Result<usize> {
    let p = cpath(path);
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; size.max(1)];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr() as *mut libc::c_void
    };
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), ptr, size) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Raw `llistxattr` into a buffer of `size` bytes (0 asks for the list's length).
pub fn llistxattr_sized(path: &Path, size: usize) -> io::Result<usize> {
    let p = cpath(path);
    let mut buf = vec![0u8; size.max(1)];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr() as *mut libc::c_char
    };
    let r = unsafe { libc::llistxattr(p.as_ptr(), ptr, size) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}
