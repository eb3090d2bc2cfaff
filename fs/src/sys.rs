//! Thin, safe wrappers over the `*at` system calls the overlay needs.
//!
//! Every call here takes a directory file descriptor plus a single path component (or a
//! relative path resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`), so no symlink
//! inside a layer can ever make the daemon touch a path outside that layer.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// Result type of the raw calls: the `errno` of the failed call.
pub type SysResult<T> = Result<T, i32>;

fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Converts a path or name to a C string; interior NULs cannot name a file.
pub fn cstring(bytes: &[u8]) -> SysResult<CString> {
    CString::new(bytes).map_err(|_| libc::EINVAL)
}

/// `openat2` with the layer-confinement flags: the path never leaves `dir`, never follows a
/// symlink (intermediate or final) and never crosses a magic link.
pub fn open_beneath(dir: BorrowedFd<'_>, path: &CStr, flags: i32) -> SysResult<OwnedFd> {
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    loop {
        // SAFETY: `how` is a valid open_how and `path` a valid C string for the call's duration.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: the kernel just returned this descriptor to us.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        match last_errno() {
            libc::EAGAIN | libc::EINTR => continue,
            e => return Err(e),
        }
    }
}

/// `openat` of a single component (no `/`) with `O_NOFOLLOW`: cannot escape `dir`.
pub fn open_child(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> SysResult<OwnedFd> {
    debug_assert!(!name.to_bytes().contains(&b'/'));
    // SAFETY: valid fd and C string.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    };
    if fd < 0 {
        Err(last_errno())
    } else {
        // SAFETY: fresh descriptor from the kernel.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; an empty name stats `dir` itself.
pub fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> SysResult<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    let flags = if name.is_empty() {
        libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH
    } else {
        libc::AT_SYMLINK_NOFOLLOW
    };
    // SAFETY: `st` is written by the kernel on success.
    let r = unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), flags) };
    if r < 0 {
        Err(last_errno())
    } else {
        // SAFETY: success means the struct was filled.
        Ok(unsafe { st.assume_init() })
    }
}

/// `fstat` of an open descriptor (works on `O_PATH` descriptors too).
pub fn stat_fd(fd: BorrowedFd<'_>) -> SysResult<libc::stat> {
    stat_at(fd, c"")
}

/// `readlinkat(dir, name)` of a single component.
pub fn readlink_at(dir: BorrowedFd<'_>, name: &CStr) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: the buffer is valid for `buf.len()` bytes.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(last_errno());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// `fstatfs` of an open descriptor.
pub fn statfs_fd(fd: BorrowedFd<'_>) -> SysResult<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `st` is written by the kernel on success.
    let r = unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) };
    if r < 0 {
        Err(last_errno())
    } else {
        // SAFETY: success means the struct was filled.
        Ok(unsafe { st.assume_init() })
    }
}

/// The `/proc/self/fd/N` path of a descriptor: the way to reach xattrs of an `O_PATH` descriptor,
/// which the `f*xattr` calls refuse. The magic link names exactly the opened object, so a
/// symlink opened with `O_PATH | O_NOFOLLOW` is itself the target, never what it points to.
fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

/// Reads the value of xattr `name` of the object open at `fd` (any kind of descriptor).
pub fn get_xattr(fd: BorrowedFd<'_>, name: &CStr) -> SysResult<Vec<u8>> {
    let path = proc_fd_path(fd);
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: buffer valid for its length; path and name are C strings.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        match last_errno() {
            libc::ERANGE => {
                // SAFETY: size query with a null buffer.
                let need = unsafe {
                    libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0)
                };
                if need < 0 {
                    return Err(last_errno());
                }
                buf.resize(need as usize + 1, 0);
            }
            e => return Err(e),
        }
    }
}

/// Whether the object at `fd` has xattr `name` with a value starting with one of `values`.
pub fn xattr_is(fd: BorrowedFd<'_>, name: &CStr, values: &[&[u8]]) -> bool {
    match get_xattr(fd, name) {
        Ok(v) => values.iter().any(|want| v.starts_with(want)),
        Err(_) => false,
    }
}

/// Lists the xattr names of the object open at `fd` as the raw NUL-separated list.
pub fn list_xattr(fd: BorrowedFd<'_>) -> SysResult<Vec<u8>> {
    let path = proc_fd_path(fd);
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: buffer valid for its length.
        let n = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        match last_errno() {
            libc::ERANGE => {
                // SAFETY: size query with a null buffer.
                let need = unsafe { libc::listxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
                if need < 0 {
                    return Err(last_errno());
                }
                buf.resize(need as usize + 1, 0);
            }
            e => return Err(e),
        }
    }
}

/// One entry of a raw directory listing.
#[derive(Debug, Clone)]
pub struct RawDirEntry {
    /// Name of the entry (never `.` or `..`).
    pub name: Box<[u8]>,
    /// Inode number in the layer's filesystem.
    pub ino: u64,
    /// `d_type` as the layer's filesystem reported it (may be `DT_UNKNOWN`).
    pub d_type: u8,
}

/// Reads every entry of the directory open (possibly `O_PATH`) at `dir`, with large
/// `getdents64` batches; `.` and `..` are left out.
pub fn read_dir(dir: BorrowedFd<'_>) -> SysResult<Vec<RawDirEntry>> {
    let fd = open_child(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buffer valid for its length.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            match last_errno() {
                libc::EINTR => continue,
                e => return Err(e),
            }
        }
        if n == 0 {
            return Ok(out);
        }
        let mut pos = 0usize;
        while pos < n as usize {
            // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, char name[]
            let rec = &buf[pos..];
            let ino = u64::from_ne_bytes(rec[0..8].try_into().expect("8 bytes"));
            let reclen = u16::from_ne_bytes(rec[16..18].try_into().expect("2 bytes")) as usize;
            let d_type = rec[18];
            let name_area = &rec[19..reclen];
            let len = name_area
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_area.len());
            let name = &name_area[..len];
            if name != b"." && name != b".." {
                out.push(RawDirEntry {
                    name: name.into(),
                    ino,
                    d_type,
                });
            }
            pos += reclen;
        }
    }
}

/// Duplicates a borrowed descriptor into an owned one.
pub fn dup(fd: BorrowedFd<'_>) -> SysResult<OwnedFd> {
    fd.try_clone_to_owned()
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
}

/// Converts an `OsStr` name to a C string.
pub fn os_cstring(name: &OsStr) -> SysResult<CString> {
    cstring(name.as_bytes())
}
