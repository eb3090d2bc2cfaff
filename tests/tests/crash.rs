//! Copy-up must be atomic: SIGKILL the daemon while a 64 MiB lower file is being copied up
//! (from the lower layer, or into an existing metadata-only copy) and the upper layer holds
//! either no copy or a complete one at the visible path, the next mount clears what was left
//! in `workdir/work`, and the lower layer never changes.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_tests::cmd::{kill_group, wait_deadline};
use strata_tests::mount::signal;
use strata_tests::*;

const SIZE: usize = 64 << 20;
const APPENDED: &[u8] = b"APPENDED";
const ITERATIONS: usize = 20;
/// The loop stops early (after at least a few iterations) once this much time has passed.
const BUDGET: Duration = Duration::from_secs(40);

/// 64 MiB: a 1 MiB pseudo-random block repeated, each MiB stamped with its index so that a
/// misplaced chunk is noticed.
fn lower_content() -> Vec<u8> {
    let block = pattern(1 << 20, 0x5eed);
    let mut v = Vec::with_capacity(SIZE);
    for i in 0..(SIZE >> 20) {
        let start = v.len();
        v.extend_from_slice(&block);
        v[start..start + 8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    v
}

/// xorshift64, seeded from the clock.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Rng(t | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// What the upper layer holds at the visible path after the crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpperState {
    NoCopy,
    Complete,
    CompleteAppended,
}

/// Checks the upper file at `p`: absent, or the whole lower content (plus possibly the
/// appended bytes); never anything else.
fn upper_state(p: &Path, want: &[u8], when: &str) -> UpperState {
    let md = match fs::symlink_metadata(p) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return UpperState::NoCopy,
        Err(e) => panic!("{when}: lstat {}: {e}", p.display()),
        Ok(md) => md,
    };
    assert!(
        md.is_file(),
        "{when}: upper {} is a {:?}, not a regular file",
        p.display(),
        md.file_type()
    );
    let data = fs::read(p).unwrap_or_else(|e| panic!("{when}: read {}: {e}", p.display()));
    assert!(
        data.len() == SIZE || data.len() == SIZE + APPENDED.len(),
        "{when}: PARTIAL COPY at the visible path {}: {} bytes (lower has {SIZE})",
        p.display(),
        data.len()
    );
    if data[..SIZE] != *want {
        let first_bad = data[..SIZE]
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap();
        panic!(
            "{when}: upper copy {} differs from the lower file from byte {first_bad} on",
            p.display()
        );
    }
    if data.len() == SIZE {
        UpperState::Complete
    } else {
        assert_eq!(&data[SIZE..], APPENDED, "{when}: appended bytes");
        UpperState::CompleteAppended
    }
}

/// What `dir` (a work dir) holds besides the shared whiteout that deletions link to, which
/// the mount creates and keeps there (as kernel overlayfs keeps its own).
fn entries(dir: &Path) -> Vec<String> {
    match fs::read_dir(dir) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Vec::new(),
        Err(e) => panic!("read_dir {}: {e}", dir.display()),
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "#whiteout")
            .collect(),
    }
}

#[test]
fn sigkill_during_copy_up_leaves_no_partial_file() {
    crash_loop(false);
}

/// The same with a metadata-only copy in place first (chmod), so that the write copies up
/// the data of an upper file that already exists.
#[test]
fn sigkill_during_data_copy_up_of_metadata_only_copy() {
    crash_loop(true);
}

fn crash_loop(meta_first: bool) {
    let sc = Scratch::new();
    let want = lower_content();
    let lower = sc.layer("lower");
    lower.file("big.bin", &want).file("small", "s\n");
    let lower_before = snapshot_raw(lower.root());
    let (upper, work) = (sc.mkdir("upper"), sc.mkdir("work"));
    let mnt = sc.mkdir("mnt");
    let strata = Strata::new(&[lower.root()]).upper(&upper, &work);
    let visible = upper.join("big.bin");
    let mut rng = Rng::new();
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut leftovers = 0;
    for i in 0..ITERATIONS {
        if i >= 5 && start.elapsed() > BUDGET {
            eprintln!("time budget used up after {i} iterations");
            break;
        }
        let when = format!("iteration {i}");
        // Start from an upper without the copy, so that every iteration copies up again.
        if fs::symlink_metadata(&visible).is_ok() {
            fs::remove_file(&visible).unwrap();
        }
        let mut g = strata.mount(&mnt);
        let daemon = g.daemon_pid();
        let target = mnt.join("big.bin");
        if meta_first {
            fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("chmod through the mount");
        }
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("printf APPENDED >> \"$1\"")
            .arg("sh")
            .arg(&target)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh");
        // 0-50 ms; every other iteration 0-15 ms, where the copy is usually still running.
        let delay = rng.below(if i % 2 == 0 { 50_000 } else { 15_000 });
        std::thread::sleep(Duration::from_micros(delay));
        signal(daemon, libc::SIGKILL);
        // The connection dies with the daemon; the writer's request fails. Bounded waits.
        if wait_deadline(&mut child, Instant::now() + Duration::from_secs(10)).is_none() {
            kill_group(&mut child);
            panic!("{when}: writer still blocked 10 s after the daemon was killed");
        }
        if let Err(e) = g.unmount() {
            panic!("{when}: cleaning up the dead mount: {e}");
        }
        drop(g);
        // A metadata-only copy holds no data, so only the merged view below can judge it.
        let state = if meta_first {
            UpperState::NoCopy
        } else {
            upper_state(
                &visible,
                &want,
                &format!("{when}, after SIGKILL at {delay} µs"),
            )
        };
        let left = entries(&work.join("work"));
        if !left.is_empty() {
            leftovers += 1;
        }
        // The next mount clears the work directory and shows the original or the copy.
        let g = strata.mount(&mnt);
        let left_after = entries(&work.join("work"));
        assert!(
            left_after.is_empty(),
            "{when}: workdir/work not cleared by the next mount: {left_after:?} \
             (before the mount: {left:?})"
        );
        let merged = fs::read(g.join("big.bin")).unwrap();
        let expect_len = match state {
            UpperState::NoCopy | UpperState::Complete => SIZE,
            UpperState::CompleteAppended => SIZE + APPENDED.len(),
        };
        if meta_first {
            // The append may or may not have landed; nothing else may differ.
            let appended = merged.len() == SIZE + APPENDED.len() && merged[SIZE..] == *APPENDED;
            assert!(
                merged.len() == SIZE || appended,
                "{when}: merged file has {} bytes after remount",
                merged.len()
            );
            let mode = fs::metadata(g.join("big.bin")).unwrap().permissions();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
                0o600,
                "{when}: the chmod before the crash was lost"
            );
        } else {
            assert_eq!(
                merged.len(),
                expect_len,
                "{when}: merged file size after remount (upper state {state:?})"
            );
        }
        assert!(
            merged[..SIZE] == want[..],
            "{when}: merged file content differs from the lower's after remount"
        );
        drop(g);
        seen.push((delay, state, left.len()));
    }
    eprintln!("(delay µs, upper state, work leftovers) per iteration: {seen:?}");
    eprintln!("iterations with leftovers in workdir/work: {leftovers}");
    assert_snapshots_eq(
        "lower before",
        &lower_before,
        "lower after",
        &snapshot_raw(lower.root()),
    );
}
