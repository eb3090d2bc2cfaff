//! Shared harness for the end-to-end tests of `stratafs`: locating the binary, bounded
//! command execution, mount guards for stratafs and kernel overlayfs, layer builders, tree
//! snapshots, and the unprivileged test user.
//!
//! Every wait is bounded; every test works below its own `/tmp/strata-e2e-XXXX`.

pub mod bin;
pub mod cmd;
pub mod fixtures;
pub mod fsops;
pub mod kernelize;
pub mod layer;
pub mod mount;
pub mod scratch;
pub mod snapshot;
pub mod user;
pub mod writes;

pub use bin::{strata_bin, stratafs_bin, workspace_dir, PublicBin};
pub use cmd::{run, run_timeout, sh, sh_ok, wait_for, with_timeout, CmdOutput};
pub use fixtures::{assert_basic_view, basic_stack};
pub use fsops::{assert_absent, assert_errno, names, Kind};
pub use kernelize::{normalize_for_kernel, XattrNs};
pub use layer::{pattern, Layer, Opaque, Whiteout};
pub use mount::{
    daemon_pids, is_mounted, kernel_overlay, lowerdir_opt, mount_at, mount_stratafs, mount_tmpfs,
    pid_alive, run_stratafs, MountGuard, Strata,
};
pub use scratch::Scratch;
pub use snapshot::{
    assert_no_markers, assert_snapshots_eq, diff_snapshots, snapshot, snapshot_raw, Entry, Snapshot,
};
pub use user::{chown_tree, ensure_dev_fuse_rw, ensure_test_user, run_as, TestUser};
