//! Small ready-made layer stacks shared by several test files.

use std::fs;
use std::path::Path;

use crate::fsops::names;
use crate::layer::Layer;
use crate::scratch::Scratch;

/// Two layers under `scratch/<prefix>1` (top) and `scratch/<prefix>2` (bottom):
/// top has `top.txt`, `both.txt` ("from top"), `dir/a`; bottom has `bottom.txt`,
/// `both.txt` ("from bottom"), `dir/b`.
pub fn basic_stack(s: &Scratch, prefix: &str) -> (Layer, Layer) {
    let top = s.layer(format!("{prefix}1"));
    let bottom = s.layer(format!("{prefix}2"));
    top.file("top.txt", "top\n")
        .file("both.txt", "from top\n")
        .file("dir/a", "a\n");
    bottom
        .file("bottom.txt", "bottom\n")
        .file("both.txt", "from bottom\n")
        .file("dir/b", "b\n");
    (top, bottom)
}

/// Asserts the merged view of [`basic_stack`] at `mnt`.
pub fn assert_basic_view(mnt: &Path) {
    assert_eq!(
        names(mnt),
        ["both.txt", "bottom.txt", "dir", "top.txt"],
        "merged root listing of {}",
        mnt.display()
    );
    assert_eq!(names(&mnt.join("dir")), ["a", "b"], "merged dir listing");
    assert_eq!(
        fs::read_to_string(mnt.join("both.txt")).unwrap(),
        "from top\n"
    );
    assert_eq!(
        fs::read_to_string(mnt.join("bottom.txt")).unwrap(),
        "bottom\n"
    );
    assert_eq!(fs::read_to_string(mnt.join("dir/b")).unwrap(), "b\n");
}
