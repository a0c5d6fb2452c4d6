//! The chart, drawn by hand (no plotting dependency for one picture): the latency CDF of warm
//! reads through the mount and on local disk, and bars of the paired ratios (mount/local).
use std::fmt::Write;

use super::report::Report;

pub(crate) fn chart(r: &Report) -> String {
    let (w, h) = (900.0, 420.0);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="20" y="20" font-size="14">warm read latency CDF (ms, log scale)</text>
<text x="480" y="20" font-size="14">paired ratios mount/local (median of rounds)</text>
"#
    );
    // Left: CDF in a 400x320 box at (40, 40).
    let (x0, y0, cw, ch) = (40.0, 40.0, 400.0, 320.0);
    let _ = writeln!(
        s,
        r##"<rect x="{x0}" y="{y0}" width="{cw}" height="{ch}" fill="none" stroke="#999"/>"##
    );
    if let Some((m, l)) = &r.cdf {
        let all: Vec<f64> = m.iter().chain(l).copied().filter(|v| *v > 0.0).collect();
        let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1e-4);
        let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
        let xs = |v: f64| x0 + cw * ((v.max(lo) / lo).ln() / (hi / lo).ln());
        for (v, colour, name, ly) in [(m, "#d62728", "mount", 60.0), (l, "#1f77b4", "local", 75.0)] {
            let pts: Vec<String> = v
                .iter()
                .enumerate()
                .map(|(i, x)| format!("{:.1},{:.1}", xs(*x), y0 + ch - ch * (i + 1) as f64 / v.len() as f64))
                .collect();
            let _ = writeln!(
                s,
                r##"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"##,
                pts.join(" ")
            );
            let _ = writeln!(s, r#"<text x="{}" y="{ly}" fill="{colour}">{name}</text>"#, x0 + 10.0);
        }
        let _ = writeln!(
            s,
            r#"<text x="{x0}" y="{}">{lo:.3}</text><text x="{}" y="{}" text-anchor="end">{hi:.2}</text>"#,
            y0 + ch + 14.0,
            x0 + cw,
            y0 + ch + 14.0
        );
    } else {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">web section not run</text>"#,
            x0 + 10.0,
            y0 + 20.0
        );
    }
    // Right: bars of ratios.
    let ratios: Vec<(String, f64)> = r
        .sections
        .iter()
        .flat_map(|sec| {
            sec.rows
                .iter()
                .filter_map(move |row| row.ratio.map(|x| (format!("{}: {}", sec.name, row.name), x)))
        })
        .collect();
    let (bx, by, bw) = (480.0, 40.0, 380.0);
    let max = ratios.iter().map(|(_, x)| *x).fold(1.0, f64::max);
    let bar_h = (320.0 / ratios.len().max(1) as f64).min(28.0);
    for (i, (name, x)) in ratios.iter().enumerate() {
        let y = by + i as f64 * bar_h;
        let len = bw * 0.6 * x / max;
        let name = name.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        let _ = writeln!(
            s,
            r##"<rect x="{bx}" y="{y:.1}" width="{len:.1}" height="{:.1}" fill="#2ca02c"/><text x="{:.1}" y="{:.1}">{x:.2} {name}</text>"##,
            bar_h * 0.7,
            bx + len + 4.0,
            y + bar_h * 0.55
        );
    }
    let one = bx + bw * 0.6 / max;
    let _ = writeln!(
        s,
        r##"<line x1="{one:.1}" y1="{by}" x2="{one:.1}" y2="{}" stroke="#555" stroke-dasharray="3,3"/>"##,
        by + 330.0
    );
    s.push_str("</svg>\n");
    s
}
