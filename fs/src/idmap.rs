//! Owner translation between the ids stored in the layers and the ids the mount shows.
//!
//! containers/storage passes `uidmapping=`/`gidmapping=` when a container's user namespace
//! differs from the one the layers were written in (e.g. `--userns=keep-id`), and
//! `squash_to_*` when every file should look owned by one user. The mapping format is
//! fuse-overlayfs's: `STORED:SHOWN:COUNT` triples joined by colons (empty fields are skipped,
//! so the leading colon Podman sometimes writes is harmless). A stored id outside every range
//! is shown as the overflow id, as the kernel shows ids a user namespace cannot map.

use std::fmt;

/// One contiguous range: stored ids `stored..stored+count` show as `shown..shown+count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// First id as stored in the layers.
    pub stored: u32,
    /// First id as shown through the mount.
    pub shown: u32,
    /// Number of ids in the range.
    pub count: u32,
}

/// Why a mapping string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMapping(pub &'static str);

impl fmt::Display for BadMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Parses `STORED:SHOWN:COUNT[:STORED:SHOWN:COUNT...]`.
pub fn parse_ranges(s: &str) -> Result<Vec<IdRange>, BadMapping> {
    let fields: Vec<&str> = s.split(':').filter(|f| !f.is_empty()).collect();
    if fields.is_empty() {
        return Err(BadMapping("expected STORED:SHOWN:COUNT triples, got none"));
    }
    if fields.len() % 3 != 0 {
        return Err(BadMapping(
            "expected STORED:SHOWN:COUNT triples (a multiple of three numbers)",
        ));
    }
    let mut out = Vec::with_capacity(fields.len() / 3);
    for t in fields.chunks(3) {
        let num = |f: &str| {
            f.parse::<u32>()
                .map_err(|_| BadMapping("every field must be a non-negative number"))
        };
        let r = IdRange {
            stored: num(t[0])?,
            shown: num(t[1])?,
            count: num(t[2])?,
        };
        if r.count == 0 {
            return Err(BadMapping("a range must have a count above zero"));
        }
        if r.stored.checked_add(r.count - 1).is_none() || r.shown.checked_add(r.count - 1).is_none()
        {
            return Err(BadMapping("a range runs past the largest id"));
        }
        out.push(r);
    }
    Ok(out)
}

/// Translation of one kind of id (uids or gids).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdTranslation {
    /// The ranges; empty means ids are shown as stored.
    pub ranges: Vec<IdRange>,
    /// Every object is shown as owned by this id (`squash_to_*`).
    pub squash: Option<u32>,
}

/// The kernel's overflow id, shown for stored ids that no range covers.
const OVERFLOW_ID: u32 = 65534;

impl IdTranslation {
    /// Whether ids pass through unchanged.
    pub fn is_identity(&self) -> bool {
        self.ranges.is_empty() && self.squash.is_none()
    }

    /// The id the mount shows for a stored id.
    pub fn shown(&self, stored: u32) -> u32 {
        if let Some(id) = self.squash {
            return id;
        }
        if self.ranges.is_empty() {
            return stored;
        }
        self.ranges
            .iter()
            .find(|r| stored >= r.stored && stored - r.stored < r.count)
            .map_or(OVERFLOW_ID, |r| r.shown + (stored - r.stored))
    }

    /// The id to store for an id the mount's user gave (a creator or a chown). Ids outside
    /// the mapping are stored as the overflow id, as fuse-overlayfs does.
    pub fn stored(&self, shown: u32) -> u32 {
        if self.ranges.is_empty() {
            return shown;
        }
        self.ranges
            .iter()
            .find(|r| shown >= r.shown && shown - r.shown < r.count)
            .map_or(OVERFLOW_ID, |r| r.stored + (shown - r.shown))
    }
}

/// Owner translation for both uids and gids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMaps {
    /// User ids.
    pub uid: IdTranslation,
    /// Group ids.
    pub gid: IdTranslation,
}

impl IdMaps {
    /// Whether any squash option is set: chown failures are then not the caller's concern,
    /// since the mount shows one owner whatever is stored (fuse-overlayfs ignores them too).
    pub fn squashing(&self) -> bool {
        self.uid.squash.is_some() || self.gid.squash.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_id_form_with_leading_colon() {
        // What Podman passes for --userns=keep-id as uid 1001.
        let r = parse_ranges(":0:1:1001:1001:0:1:1002:1002:64535").unwrap();
        assert_eq!(r.len(), 3);
        let t = IdTranslation {
            ranges: r,
            squash: None,
        };
        assert_eq!(t.shown(0), 1);
        assert_eq!(t.shown(1000), 1001);
        assert_eq!(t.shown(1001), 0);
        assert_eq!(t.shown(1002), 1002);
        assert_eq!(t.shown(70000), 65534);
        for id in [0, 5, 1000, 1001, 1002, 60000] {
            assert_eq!(t.stored(t.shown(id)), id);
        }
    }

    #[test]
    fn bad_mappings() {
        assert!(parse_ranges("").is_err());
        assert!(parse_ranges("0:1").is_err());
        assert!(parse_ranges("0:x:1").is_err());
        assert!(parse_ranges("0:1:0").is_err());
        assert!(parse_ranges("4294967295:0:2").is_err());
    }

    #[test]
    fn squash_wins_for_display_only() {
        let t = IdTranslation {
            ranges: parse_ranges("0:100:10").unwrap(),
            squash: Some(0),
        };
        assert_eq!(t.shown(3), 0);
        assert_eq!(t.stored(103), 3);
        assert!(IdTranslation::default().is_identity());
    }
}
