//! `strata-fs`: a union filesystem with kernel overlayfs semantics, served over FUSE.
//!
//! The overlay rules live in [`overlay::Overlay`], which reads like the semantics it
//! implements and knows nothing of FUSE; [`fuse::StrataFuse`] is the thin adapter, and
//! [`daemon`] runs a mount the way fuse-overlayfs's callers expect.

pub mod caller;
pub mod daemon;
pub mod dirmerge;
pub mod fasthash;
pub mod fdcache;
pub mod fuse;
pub mod handles;
pub mod heap;
pub mod idmap;
pub mod inode;
pub mod layers;
pub mod namefilter;
pub mod nodetable;
pub mod options;
pub mod overlay;
pub mod passthrough;
pub mod statoverride;
pub mod stats;
pub mod sys;
pub mod upper;
pub mod whiteout;
