//! Medians, ratios to kernel overlayfs, and the markdown and JSON renderings.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::bench::{Metric, Mismatch, Sample, Workload};
use crate::mounts::{Implementation, Kind};
use crate::stack::Manifest;
use crate::sys::Machine;

/// Median of `v` (mean of the middle two for an even count); `None` when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// One workload's medians across implementations.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Workload id.
    pub workload: String,
    /// Description.
    pub description: String,
    /// Unit with direction.
    pub unit: String,
    /// `lower` or `higher` is better.
    pub better: String,
    /// Median value per implementation id.
    pub median: BTreeMap<String, f64>,
    /// Smallest and largest sample per implementation id.
    pub range: BTreeMap<String, (f64, f64)>,
    /// Median / kernel median per implementation id (time: lower is better; throughput:
    /// higher is better).
    pub ratio_to_kernel: BTreeMap<String, f64>,
    /// Median daemon CPU seconds per implementation id.
    pub daemon_cpu_secs: BTreeMap<String, f64>,
    /// FUSE requests per implementation id, medians over the repetitions.
    pub requests: BTreeMap<String, RequestCounts>,
    /// Failed samples per implementation id.
    pub errors: BTreeMap<String, usize>,
}

/// Medians of the FUSE requests one workload made an implementation's daemon answer.
#[derive(Debug, Clone, Serialize)]
pub struct RequestCounts {
    /// All requests.
    pub total: f64,
    /// By opcode name.
    pub by_op: BTreeMap<String, f64>,
    /// Some repetition lost events: the counts are lower bounds.
    pub lost: bool,
}

impl RequestCounts {
    fn of(samples: &[&Sample]) -> Option<RequestCounts> {
        let reqs: Vec<_> = samples.iter().filter_map(|s| s.requests.as_ref()).collect();
        let total: Vec<f64> = reqs.iter().map(|r| r.total as f64).collect();
        let mut ops: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for r in &reqs {
            for op in r.by_op.keys() {
                ops.entry(op).or_default();
            }
        }
        for (op, v) in ops.iter_mut() {
            // A repetition without the opcode counts as zero of it.
            v.extend(
                reqs.iter()
                    .map(|r| r.by_op.get(*op).copied().unwrap_or(0) as f64),
            );
        }
        Some(RequestCounts {
            total: median(&total)?,
            by_op: ops
                .into_iter()
                .filter_map(|(op, v)| Some((op.to_string(), median(&v)?)))
                .collect(),
            lost: reqs.iter().any(|r| r.lost),
        })
    }

    /// `12,345` (`≥` in front when events were lost).
    fn shown_total(&self) -> String {
        format!(
            "{}{}",
            if self.lost { "≥" } else { "" },
            thousands(self.total)
        )
    }

    /// The biggest opcodes, `LOOKUP 20,000 · CREATE 20,000 · ...`.
    fn mix(&self, most: usize) -> String {
        let mut ops: Vec<(&String, &f64)> = self.by_op.iter().filter(|(_, v)| **v >= 1.0).collect();
        ops.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
        let mut parts: Vec<String> = ops
            .iter()
            .take(most)
            .map(|(op, v)| format!("{op} {}", thousands(**v)))
            .collect();
        if ops.len() > most {
            let rest: f64 = ops[most..].iter().map(|(_, v)| **v).sum();
            parts.push(format!("other {}", thousands(rest)));
        }
        parts.join(" · ")
    }
}

/// `12345.0` as `12,345`.
fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Builds the rows from the samples.
pub fn summarize(workloads: &[Workload], samples: &[Sample], impls: &[Implementation]) -> Vec<Row> {
    let mut rows = Vec::new();
    for w in workloads {
        let mut row = Row {
            workload: w.id.to_string(),
            description: w.description.clone(),
            unit: w.metric.unit().to_string(),
            better: if w.metric == Metric::Mbps {
                "higher".into()
            } else {
                "lower".into()
            },
            median: BTreeMap::new(),
            range: BTreeMap::new(),
            ratio_to_kernel: BTreeMap::new(),
            daemon_cpu_secs: BTreeMap::new(),
            requests: BTreeMap::new(),
            errors: BTreeMap::new(),
        };
        let mut any = false;
        for imp in impls {
            let id = imp.kind.id();
            let of: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.workload == w.id && s.imp == id)
                .collect();
            any |= !of.is_empty();
            let vals: Vec<f64> = of.iter().filter_map(|s| s.value).collect();
            if let Some(m) = median(&vals) {
                row.median.insert(id.into(), m);
                let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                row.range.insert(id.into(), (lo, hi));
            }
            let cpu: Vec<f64> = of.iter().filter_map(|s| s.daemon_cpu_secs).collect();
            if let Some(c) = median(&cpu) {
                row.daemon_cpu_secs.insert(id.into(), c);
            }
            if let Some(r) = RequestCounts::of(&of) {
                row.requests.insert(id.into(), r);
            }
            let errs = of.iter().filter(|s| s.error.is_some()).count();
            if errs > 0 {
                row.errors.insert(id.into(), errs);
            }
        }
        if !any {
            continue;
        }
        if w.metric.has_ratio() {
            if let Some(k) = row.median.get(Kind::Kernel.id()).copied() {
                for (id, v) in &row.median {
                    if id != Kind::Kernel.id() && k > 0.0 {
                        row.ratio_to_kernel.insert(id.clone(), v / k);
                    }
                }
            }
        }
        rows.push(row);
    }
    rows
}

fn fmt_value(metric: &str, v: f64) -> String {
    if metric.starts_with("MB/s") || metric.starts_with("B/inode") {
        format!("{v:.0}")
    } else if metric.starts_with("MiB") {
        format!("{v:.1}")
    } else if v < 0.01 {
        format!("{v:.4}")
    } else if v < 1.0 {
        format!("{v:.3}")
    } else if v < 100.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// A text column after the implementations' columns: its heading and its cell of a row.
type ExtraColumn<'f> = (&'f str, &'f dyn Fn(&Row) -> String);

/// A markdown table under `title`: one row per `rows`, one column per implementation in
/// `fuse` (`cell` of the row and the implementation's id, "—" when absent), and an `extra`
/// text column; nothing when there are no implementations or rows.
fn per_fuse_table<'a>(
    s: &mut String,
    title: &str,
    fuse: &[&Implementation],
    rows: impl Iterator<Item = &'a Row>,
    cell: impl Fn(&Row, &str) -> Option<String>,
    extra: Option<ExtraColumn<'_>>,
) {
    let mut rows = rows.peekable();
    if fuse.is_empty() || rows.peek().is_none() {
        return;
    }
    let _ = write!(s, "{title}\n| workload |");
    for i in fuse {
        let _ = write!(s, " {} |", i.label);
    }
    if let Some((head, _)) = extra {
        let _ = write!(s, " {head} |");
    }
    s.push_str("\n|---|");
    for _ in fuse {
        s.push_str("---:|");
    }
    if extra.is_some() {
        s.push_str("---|");
    }
    s.push('\n');
    for r in rows {
        let _ = write!(s, "| {} |", r.workload);
        for i in fuse {
            let c = cell(r, i.kind.id()).unwrap_or_else(|| "—".into());
            let _ = write!(s, " {c} |");
        }
        if let Some((_, f)) = extra {
            let _ = write!(s, " {} |", f(r));
        }
        s.push('\n');
    }
}

/// Everything the report needs.
pub struct Report<'a> {
    /// Quick or full.
    pub quick: bool,
    /// Repetitions.
    pub reps: usize,
    /// Machine facts.
    pub machine: &'a Machine,
    /// Load averages at the end.
    pub loadavg_end: String,
    /// The stack.
    pub manifest: &'a Manifest,
    /// Columns.
    pub impls: &'a [Implementation],
    /// Rows.
    pub rows: &'a [Row],
    /// Same-data mismatches.
    pub mismatches: &'a [Mismatch],
    /// Whether the lower layers were unchanged at the end.
    pub lowers_unchanged: bool,
    /// Skipped implementations and other notes.
    pub notes: &'a [String],
    /// Wall time of the whole run.
    pub elapsed_secs: f64,
}

impl Report<'_> {
    /// The markdown rendering: facts, the results table, daemon CPU, checks, notes.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = self.machine;
        let man = self.manifest;
        let _ = writeln!(
            s,
            "## strata-bench: {} mode, {} repetition(s), interleaved\n",
            if self.quick { "quick" } else { "full" },
            self.reps
        );
        let _ = writeln!(
            s,
            "Machine: {} vCPU ({}), {:.1} GiB RAM, Linux {}; {}; load average {} at start, {} at end; run took {:.0} s.\n",
            m.nproc,
            m.cpu,
            m.mem_bytes as f64 / (1u64 << 30) as f64,
            m.kernel,
            m.date,
            m.loadavg_start,
            self.loadavg_end,
            self.elapsed_secs
        );
        let _ = writeln!(
            s,
            "Stack: L1 = {} entries ({} MB) from /usr + bigdir/ ({} files) + bigfile ({} MiB); L2 overrides {} files, whites out {} files and {}, makes {} opaque; bigdir/ merges to {} entries.\n",
            man.usr_entries,
            man.usr_bytes / 1_000_000,
            man.spec.bigdir_entries,
            man.spec.bigfile_bytes >> 20,
            man.overridden,
            man.whited_out,
            man.whiteout_dir,
            man.opaque_dir,
            man.bigdir_merged,
        );
        let others: Vec<&Implementation> = self
            .impls
            .iter()
            .filter(|i| i.kind != Kind::Kernel)
            .collect();
        let has_kernel = self.impls.iter().any(|i| i.kind == Kind::Kernel);
        // Header.
        s.push_str("| workload | unit |");
        for i in self.impls {
            let _ = write!(s, " {} |", i.label);
        }
        if has_kernel {
            for i in &others {
                let _ = write!(s, " {} ÷ kernel |", i.kind.id());
            }
        }
        s.push('\n');
        let ncols = 2 + self.impls.len() + if has_kernel { others.len() } else { 0 };
        s.push('|');
        for c in 0..ncols {
            s.push_str(if c < 2 { "---|" } else { "---:|" });
        }
        s.push('\n');
        for r in self.rows {
            let _ = write!(s, "| {} | {} |", r.workload, r.unit);
            for i in self.impls {
                let id = i.kind.id();
                let cell = match (r.median.get(id), r.errors.get(id)) {
                    (Some(v), None) => fmt_value(&r.unit, *v),
                    (Some(v), Some(e)) => format!("{} ({e} err)", fmt_value(&r.unit, *v)),
                    (None, Some(_)) => "ERR".into(),
                    (None, None) => "—".into(),
                };
                let _ = write!(s, " {cell} |");
            }
            if has_kernel {
                for i in &others {
                    let cell = r
                        .ratio_to_kernel
                        .get(i.kind.id())
                        .map(|v| format!("{v:.2}"))
                        .unwrap_or_else(|| "—".into());
                    let _ = write!(s, " {cell} |");
                }
            }
            s.push('\n');
        }
        s.push_str(
            "\n↓ lower is better: ratio = impl time ÷ kernel time (targets: metadata ≤ 1.5).  \
             ↑ higher is better: ratio = impl MB/s ÷ kernel MB/s (targets: data ≥ 0.9 as root, ≥ 0.7 rootless).  \
             Values are medians over the repetitions; min/max are in the JSON.\n\n",
        );
        s.push_str("Workloads:\n");
        for r in self.rows {
            let _ = writeln!(s, "- `{}`: {}", r.workload, r.description);
        }

        // Daemon CPU and requests, FUSE implementations only.
        let fuse: Vec<&Implementation> = others.clone();
        per_fuse_table(
            &mut s,
            "\nDaemon CPU time (user + system, s, median) per workload:\n",
            &fuse,
            self.rows.iter().filter(|r| !r.daemon_cpu_secs.is_empty()),
            |r, id| r.daemon_cpu_secs.get(id).map(|v| format!("{v:.2}")),
            None,
        );
        per_fuse_table(
            &mut s,
            "\nFUSE requests the kernel sent per workload (median; from the `fuse:fuse_request_send` tracepoint), with stratafs's biggest opcodes:\n",
            &fuse,
            self.rows.iter().filter(|r| !r.requests.is_empty()),
            |r, id| r.requests.get(id).map(RequestCounts::shown_total),
            Some(("stratafs mix", &|r: &Row| {
                r.requests
                    .get(Kind::Stratafs.id())
                    .map(|c| c.mix(4))
                    .unwrap_or_default()
            })),
        );

        // Checks.
        s.push_str("\nSame-data check: ");
        if self.mismatches.is_empty() {
            s.push_str("every implementation showed the same tree, sizes, modes, symlink targets and sampled contents, before and after the writes.\n");
        } else {
            let _ = writeln!(s, "**{} MISMATCH(ES)**", self.mismatches.len());
            for mm in self.mismatches {
                let _ = writeln!(
                    s,
                    "- `{}`: {} rep {} differs from {} ({} vs {})",
                    mm.check, mm.imp, mm.rep, mm.reference, mm.digests.0, mm.digests.1
                );
                if !mm.diff.is_empty() {
                    s.push_str("  ```\n");
                    for l in &mm.diff {
                        let _ = writeln!(s, "  {l}");
                    }
                    s.push_str("  ```\n");
                }
            }
        }
        let _ = writeln!(
            s,
            "Lower layers unchanged: {}",
            if self.lowers_unchanged {
                "yes"
            } else {
                "**NO**"
            }
        );
        for n in self.notes {
            let _ = writeln!(s, "\nNote: {n}");
        }
        s
    }

    /// The JSON rendering (everything, samples included).
    pub fn json(&self, workloads: &[Workload], samples: &[Sample]) -> serde_json::Value {
        let man = self.manifest;
        serde_json::json!({
            "tool": "strata-bench",
            "mode": if self.quick { "quick" } else { "full" },
            "reps": self.reps,
            "machine": self.machine,
            "loadavg_end": self.loadavg_end,
            "elapsed_secs": self.elapsed_secs,
            "stack": {
                "key": man.spec.key(),
                "spec": man.spec,
                "l1": man.l1,
                "l2": man.l2,
                "usr_entries": man.usr_entries,
                "usr_bytes": man.usr_bytes,
                "overridden": man.overridden,
                "whited_out": man.whited_out,
                "whiteout_dir": man.whiteout_dir,
                "opaque_dir": man.opaque_dir,
                "bigdir_merged": man.bigdir_merged,
                "tar_subtree": man.tar_subtree,
                "rm_subtree": man.rm_subtree,
                "tarball_bytes": man.tarball_bytes,
                "copyup_files": man.copyup_files.len(),
            },
            "implementations": self.impls,
            "workloads": workloads,
            "summary": self.rows,
            "samples": samples,
            "checks": {
                "same_data": self.mismatches.is_empty(),
                "mismatches": self.mismatches,
                "lowers_unchanged": self.lowers_unchanged,
            },
            "notes": self.notes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
