//! Thin, safe wrappers over the `*at` system calls the overlay needs.
//!
//! Every call here takes a directory file descriptor plus a single path component (or a
//! relative path resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`), so no symlink
//! inside a layer can ever make the daemon touch a path outside that layer.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};

/// Result type of the raw calls: the `errno` of the failed call.
pub type SysResult<T> = Result<T, i32>;

/// The calling thread's `errno` (EIO if there is none).
pub fn last_errno() -> i32 {
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

/// Creates (or opens) `name` in `dir` with `O_CREAT` and permission bits `mode`.
pub fn create_child(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> SysResult<OwnedFd> {
    debug_assert!(!name.to_bytes().contains(&b'/'));
    // SAFETY: valid fd and C string.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        Err(last_errno())
    } else {
        // SAFETY: fresh descriptor from the kernel.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// Opens object `name` in `dir` with `flags`; with an empty name, reopens `dir` itself (which
/// may be an `O_PATH` descriptor on a file) through its `/proc/self/fd` link.
pub fn reopen_at(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> SysResult<OwnedFd> {
    if !name.is_empty() {
        return open_child(dir, name, flags);
    }
    let (path, _) = proc_path(dir, name);
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
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

/// The path that reaches object `name` in directory `dir` for the xattr calls, which have no
/// `*at` form that accepts `O_PATH` descriptors: `/proc/self/fd/N/NAME`, or `/proc/self/fd/N`
/// for the directory itself. The magic link names exactly our descriptor; the final `NAME` is
/// a single component that the `l*` calls do not follow.
fn proc_path(dir: BorrowedFd<'_>, name: &CStr) -> (CString, bool) {
    let mut p = format!("/proc/self/fd/{}", dir.as_raw_fd()).into_bytes();
    let follow = name.is_empty();
    if !follow {
        p.push(b'/');
        p.extend_from_slice(name.to_bytes());
    }
    (CString::new(p).expect("no NUL"), follow)
}

fn sized_read(mut call: impl FnMut(*mut libc::c_void, usize) -> isize) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        let n = call(buf.as_mut_ptr().cast(), buf.len());
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        match last_errno() {
            libc::ERANGE => {
                let need = call(std::ptr::null_mut(), 0);
                if need < 0 {
                    return Err(last_errno());
                }
                buf.resize(need as usize + 1, 0);
            }
            e => return Err(e),
        }
    }
}

/// The `*xattrat` calls of Linux 6.13 (numbered alike on every architecture): they take a
/// directory descriptor and a name, so an xattr of a layer object costs one path step instead
/// of a walk through `/proc/self/fd/N/NAME` (0.9 against 3.2 us per call here). Cleared on
/// the first ENOSYS, after which the `/proc` paths serve.
static XATTRAT: AtomicBool = AtomicBool::new(true);
const SYS_SETXATTRAT: libc::c_long = 463;
const SYS_GETXATTRAT: libc::c_long = 464;
const SYS_LISTXATTRAT: libc::c_long = 465;
const SYS_REMOVEXATTRAT: libc::c_long = 466;

/// `struct xattr_args` of the `*xattrat` calls.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// Makes `*xattrat` call `nr` on object `name` in `dir` (never following a final symlink),
/// with the call's remaining arguments in `rest`; `None` when the name is empty or the kernel
/// lacks the calls, and the `/proc` path must serve instead (the calls refuse O_PATH
/// descriptors with an empty name, so the object itself always goes through `/proc`).
///
/// # Safety
/// `rest` must hold what call `nr` takes after its flags: pointers valid for the lengths
/// given alongside them.
unsafe fn xattrat(
    nr: libc::c_long,
    dir: BorrowedFd<'_>,
    name: &CStr,
    rest: [usize; 3],
) -> Option<libc::c_long> {
    if name.is_empty() || !XATTRAT.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: valid fd and C string; the caller vouches for `rest`.
    let r = unsafe {
        libc::syscall(
            nr,
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            rest[0],
            rest[1],
            rest[2],
        )
    };
    if r < 0 && last_errno() == libc::ENOSYS {
        XATTRAT.store(false, Ordering::Relaxed);
        return None;
    }
    Some(r)
}

/// Reads xattr `xname` of object `name` in `dir` (of `dir` itself when `name` is empty).
pub fn get_xattr_at(dir: BorrowedFd<'_>, name: &CStr, xname: &CStr) -> SysResult<Vec<u8>> {
    sized_read(|buf, len| {
        let mut args = XattrArgs {
            value: buf as u64,
            size: len as u32,
            flags: 0,
        };
        let rest = [
            xname.as_ptr() as usize,
            &mut args as *mut XattrArgs as usize,
            std::mem::size_of::<XattrArgs>(),
        ];
        // SAFETY: a C string and the argument struct, whose buffer is valid for its size.
        if let Some(r) = unsafe { xattrat(SYS_GETXATTRAT, dir, name, rest) } {
            return r as isize;
        }
        let (path, follow) = proc_path(dir, name);
        // SAFETY: valid C strings; buf is valid for len bytes (or null with len 0).
        unsafe {
            if follow {
                libc::getxattr(path.as_ptr(), xname.as_ptr(), buf, len)
            } else {
                libc::lgetxattr(path.as_ptr(), xname.as_ptr(), buf, len)
            }
        }
    })
}

/// Lists the xattr names (NUL-separated) of object `name` in `dir`.
pub fn list_xattr_at(dir: BorrowedFd<'_>, name: &CStr) -> SysResult<Vec<u8>> {
    sized_read(|buf, len| {
        // SAFETY: buf is valid for len bytes (or null with len 0).
        if let Some(r) = unsafe { xattrat(SYS_LISTXATTRAT, dir, name, [buf as usize, len, 0]) } {
            return r as isize;
        }
        let (path, follow) = proc_path(dir, name);
        // SAFETY: valid C string; buf is valid for len bytes (or null with len 0).
        unsafe {
            if follow {
                libc::listxattr(path.as_ptr(), buf.cast(), len)
            } else {
                libc::llistxattr(path.as_ptr(), buf.cast(), len)
            }
        }
    })
}

/// Sets xattr `xname` of object `name` in `dir`.
pub fn set_xattr_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    xname: &CStr,
    value: &[u8],
    flags: i32,
) -> SysResult<()> {
    let args = XattrArgs {
        value: value.as_ptr() as u64,
        size: value.len() as u32,
        flags: flags as u32,
    };
    let rest = [
        xname.as_ptr() as usize,
        &args as *const XattrArgs as usize,
        std::mem::size_of::<XattrArgs>(),
    ];
    // SAFETY: a C string and the argument struct pointing at `value`.
    if let Some(r) = unsafe { xattrat(SYS_SETXATTRAT, dir, name, rest) } {
        return check(r as libc::c_int);
    }
    let (path, follow) = proc_path(dir, name);
    let (p, x, v, n) = (
        path.as_ptr(),
        xname.as_ptr(),
        value.as_ptr().cast(),
        value.len(),
    );
    // SAFETY: valid C strings and value buffer.
    check(unsafe {
        if follow {
            libc::setxattr(p, x, v, n, flags)
        } else {
            libc::lsetxattr(p, x, v, n, flags)
        }
    })
}

/// Removes xattr `xname` of object `name` in `dir`.
pub fn remove_xattr_at(dir: BorrowedFd<'_>, name: &CStr, xname: &CStr) -> SysResult<()> {
    // SAFETY: a C string; the unused arguments are ignored.
    if let Some(r) = unsafe {
        xattrat(
            SYS_REMOVEXATTRAT,
            dir,
            name,
            [xname.as_ptr() as usize, 0, 0],
        )
    } {
        return check(r as libc::c_int);
    }
    let (path, follow) = proc_path(dir, name);
    // SAFETY: valid C strings.
    check(unsafe {
        if follow {
            libc::removexattr(path.as_ptr(), xname.as_ptr())
        } else {
            libc::lremovexattr(path.as_ptr(), xname.as_ptr())
        }
    })
}

/// Reads xattr `xname` of the object open at `fd` (any kind of descriptor).
pub fn get_xattr(fd: BorrowedFd<'_>, xname: &CStr) -> SysResult<Vec<u8>> {
    get_xattr_at(fd, c"", xname)
}

/// Lists the xattr names of the object open at `fd` as the raw NUL-separated list.
pub fn list_xattr(fd: BorrowedFd<'_>) -> SysResult<Vec<u8>> {
    list_xattr_at(fd, c"")
}

/// Whether `name` is among `names`, a list as [`list_xattr`] returns it.
pub fn xattr_listed(names: &[u8], name: &CStr) -> bool {
    names.split(|&b| b == 0).any(|n| n == name.to_bytes())
}

fn check(r: libc::c_int) -> SysResult<()> {
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

/// Tells the kernel that `fd` will be read sequentially (a read-ahead window twice the
/// device's); a hint, so failure is ignored.
pub fn advise_sequential(fd: BorrowedFd<'_>) {
    // SAFETY: plain fadvise on our descriptor.
    unsafe { libc::posix_fadvise(fd.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
}

/// `unlinkat(dir, name, flags)`.
pub fn unlink_at(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> SysResult<()> {
    // SAFETY: valid fd and C string.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })
}

/// `mkdirat(dir, name, mode)`.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> SysResult<()> {
    // SAFETY: valid fd and C string.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })
}

/// `mknodat(dir, name, mode, rdev)`.
pub fn mknod_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> SysResult<()> {
    // SAFETY: valid fd and C string.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) })
}

/// `symlinkat(target, dir, name)`.
pub fn symlink_at(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> SysResult<()> {
    // SAFETY: valid fd and C strings.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
}

/// `linkat(odir, oname, ndir, nname, 0)`: never follows a symlink.
pub fn link_at(
    odir: BorrowedFd<'_>,
    oname: &CStr,
    ndir: BorrowedFd<'_>,
    nname: &CStr,
) -> SysResult<()> {
    let (o, n) = (odir.as_raw_fd(), ndir.as_raw_fd());
    // SAFETY: valid fds and C strings.
    check(unsafe { libc::linkat(o, oname.as_ptr(), n, nname.as_ptr(), 0) })
}

/// Gives the object open (possibly `O_PATH`) at `fd` the new name `ndir/nname`, through its
/// `/proc/self/fd` link (which, unlike `AT_EMPTY_PATH`, needs no privilege).
pub fn link_fd(fd: BorrowedFd<'_>, ndir: BorrowedFd<'_>, nname: &CStr) -> SysResult<()> {
    let (path, _) = proc_path(fd, c"");
    // SAFETY: valid fds and C strings.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            path.as_ptr(),
            ndir.as_raw_fd(),
            nname.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
}

/// `renameat2(odir, oname, ndir, nname, flags)`.
pub fn rename_at(
    odir: BorrowedFd<'_>,
    oname: &CStr,
    ndir: BorrowedFd<'_>,
    nname: &CStr,
    flags: u32,
) -> SysResult<()> {
    let (o, n) = (odir.as_raw_fd(), ndir.as_raw_fd());
    // SAFETY: valid fds and C strings.
    check(unsafe { libc::renameat2(o, oname.as_ptr(), n, nname.as_ptr(), flags) })
}

/// `fchownat(dir, name, uid, gid, AT_SYMLINK_NOFOLLOW)`; an empty name changes `dir` itself.
pub fn chown_at(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> SysResult<()> {
    let flags = if name.is_empty() {
        libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH
    } else {
        libc::AT_SYMLINK_NOFOLLOW
    };
    // SAFETY: valid fd and C string.
    check(unsafe { libc::fchownat(dir.as_raw_fd(), name.as_ptr(), uid, gid, flags) })
}

/// Whether `fchmodat2` (Linux 6.6) may be tried; cleared on its first ENOSYS.
static FCHMODAT2: AtomicBool = AtomicBool::new(true);

/// Changes the mode of object `name` in `dir` (never of what a symlink points to).
pub fn chmod_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> SysResult<()> {
    if FCHMODAT2.load(Ordering::Relaxed) {
        let flags = if name.is_empty() {
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH
        } else {
            libc::AT_SYMLINK_NOFOLLOW
        };
        // SAFETY: valid fd and C string.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fchmodat2,
                dir.as_raw_fd(),
                name.as_ptr(),
                mode,
                flags,
            )
        };
        if r == 0 {
            return Ok(());
        }
        match last_errno() {
            libc::ENOSYS => FCHMODAT2.store(false, Ordering::Relaxed),
            e => return Err(e),
        }
    }
    let fd = if name.is_empty() {
        dup(dir)?
    } else {
        open_child(dir, name, libc::O_PATH)?
    };
    // fchmodat cannot refuse to follow a symlink; the /proc path of an O_PATH descriptor
    // names exactly the object we opened.
    let (path, _) = proc_path(fd.as_fd(), c"");
    // SAFETY: valid C string.
    check(unsafe { libc::chmod(path.as_ptr(), mode) })
}

/// `utimensat(dir, name, times, AT_SYMLINK_NOFOLLOW)`; an empty name changes `dir` itself
/// (which may be an `O_PATH` descriptor).
pub fn utimens_at(dir: BorrowedFd<'_>, name: &CStr, times: &[libc::timespec; 2]) -> SysResult<()> {
    let flags = if name.is_empty() {
        libc::AT_EMPTY_PATH
    } else {
        libc::AT_SYMLINK_NOFOLLOW
    };
    // SAFETY: valid fd, C string and times array.
    let r =
        check(unsafe { libc::utimensat(dir.as_raw_fd(), name.as_ptr(), times.as_ptr(), flags) });
    if r == Err(libc::EINVAL) && name.is_empty() {
        // Kernels before AT_EMPTY_PATH for utimensat: the /proc link names the object.
        let (path, _) = proc_path(dir, name);
        // SAFETY: valid C string and times array.
        return check(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) });
    }
    r
}

/// Gives object `name` in `dir` the access and modification times of `st` (an empty name
/// changes `dir` itself).
pub fn set_times_from(dir: BorrowedFd<'_>, name: &CStr, st: &libc::stat) -> SysResult<()> {
    let times = [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ];
    utimens_at(dir, name, &times)
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
    read_open_dir(fd)
}

/// [`read_dir`], and whether the directory matches names regardless of case (`chattr +F`
/// on ext4 or f2fs), where a name's bytes do not say whether a lookup finds it.
pub fn read_dir_casefold(dir: BorrowedFd<'_>) -> SysResult<(Vec<RawDirEntry>, bool)> {
    const FS_CASEFOLD_FL: libc::c_long = 0x4000_0000;
    let fd = open_child(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one long (the kernel reads and writes an int; a long
    // holds it) into `flags`. Unsupported (not ext4/f2fs-like): no flags, so no casefold.
    let casefold = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) } == 0
        && flags & FS_CASEFOLD_FL != 0;
    Ok((read_open_dir(fd)?, casefold))
}

/// Reads every entry of directory `fd`, from its current position.
fn read_open_dir(fd: OwnedFd) -> SysResult<Vec<RawDirEntry>> {
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
