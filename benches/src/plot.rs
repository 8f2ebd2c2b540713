//! SVG bar charts of `qj bench --output json` rows, for RFC.md: one chart
//! per workload, one bar per target (and thread count), operations per
//! second on a linear axis. Hand-written SVG keeps the dependency list short.

use std::fmt::Write;

use crate::report::BenchRow;

/// Colours per target, in `TargetKind::ALL` order, then the dedup targets.
const COLOURS: [(&str, &str); 10] = [
    ("journal", "#1b9e77"),
    ("journal-draft", "#66a61e"),
    ("journal-logged", "#e6ab02"),
    ("ordered", "#d95f02"),
    ("qemu", "#7570b3"),
    ("qemu-lazy", "#a6a0d8"),
    ("qemu-prealloc", "#4b4491"),
    ("raw", "#999999"),
    ("journal-dedup", "#e7298a"),
    ("journal-dedup-trust", "#f4a6cf"),
];

fn colour(target: &str) -> &'static str {
    COLOURS
        .iter()
        .find(|(t, _)| *t == target)
        .map_or("#444444", |(_, c)| c)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One SVG chart of the rows of `workload` (ops/s per target and thread
/// count); `None` when no row of that workload has a rate.
#[must_use]
pub fn workload_chart(rows: &[BenchRow], workload: &str, title: &str) -> Option<String> {
    let bars: Vec<&BenchRow> = rows
        .iter()
        .filter(|r| r.workload == workload && r.ops_per_s.is_some())
        .collect();
    let max = bars
        .iter()
        .filter_map(|r| r.ops_per_s)
        .fold(0.0f64, f64::max);
    if bars.is_empty() || max <= 0.0 {
        return None;
    }
    let (bar_w, gap, left, top, height) = (22.0, 6.0, 70.0, 40.0, 220.0);
    let width = left + bars.len() as f64 * (bar_w + gap) + 20.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{:.0}" font-family="sans-serif" font-size="11">"#,
        top + height + 110.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    for tick in 0..=4 {
        let v = max * f64::from(tick) / 4.0;
        let y = top + height - height * f64::from(tick) / 4.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" x2="{:.0}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
            width - 10.0,
            left - 6.0,
            y + 4.0
        );
    }
    for (i, r) in bars.iter().enumerate() {
        let v = r.ops_per_s.unwrap_or(0.0);
        let h = height * v / max;
        let x = left + i as f64 * (bar_w + gap);
        let y = top + height - h;
        let label = if r.workload == "threads-sync" {
            format!("{} {}t", r.target, r.threads)
        } else {
            r.target.clone()
        };
        let _ = writeln!(
            svg,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{bar_w}" height="{h:.1}" fill="{}"><title>{}: {v:.0} ops/s</title></rect>"#,
            colour(&r.target),
            escape(&label)
        );
        let _ = writeln!(
            svg,
            r#"<text transform="translate({:.1},{:.1}) rotate(60)">{}</text>"#,
            x + 4.0,
            top + height + 12.0,
            escape(&label)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="12" y="{:.0}" transform="rotate(-90 12 {:.0})">ops/s</text>"#,
        top + height / 2.0,
        top + height / 2.0
    );
    svg.push_str("</svg>\n");
    Some(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row as JSON written before the dedup keys existed: old bench
    /// files must still plot.
    fn row(target: &str, ops: Option<f64>) -> BenchRow {
        serde_json::from_value(serde_json::json!({
            "workload": "alloc-sync-4k",
            "target": target,
            "threads": 1,
            "ops": 10,
            "ops_per_s": ops,
            "mb_per_s": null,
            "p50_us": null,
            "p99_us": null,
            "flushes_per_op": null,
            "bytes_written_per_op": null,
            "vs_raw": null,
            "vs_qemu": null,
            "vs_ordered": null,
            "note": null,
        }))
        .expect("a bench row without the newer keys")
    }

    #[test]
    fn bars_scale_to_the_largest_rate() {
        let rows = vec![
            row("journal", Some(200.0)),
            row("ordered", Some(100.0)),
            row("qemu", None),
        ];
        let svg = workload_chart(&rows, "alloc-sync-4k", "t").unwrap();
        assert!(svg.contains(r##"height="220.0" fill="#1b9e77""##), "{svg}");
        assert!(svg.contains(r##"height="110.0" fill="#d95f02""##), "{svg}");
        assert!(!svg.contains("qemu"), "rows without a rate are left out");
        assert!(workload_chart(&rows, "read", "t").is_none());
    }
}
