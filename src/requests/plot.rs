//! Plots of request metrics as inline SVG, drawn on the server: no script, no network, and
//! nothing a Content-Security-Policy without `unsafe-inline` refuses (presentation attributes
//! only, no `style` attribute). The only text from outside keter is an event's description,
//! escaped here.

use std::fmt::Write;

use super::{Point, Span};

/// Something that happened to an app, marked on the time axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    /// Unix time in seconds.
    pub at: u64,
    /// A short kind: `deploy`, `deploy failed`, `restart`, `health replacement`.
    pub kind: &'static str,
    pub detail: String,
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 150.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 22.0;

/// Colours of the series, readable on the page's white cards.
const REQUESTS: &str = "#2563eb";
const ERRORS: &str = "#dc2626";
const P50: &str = "#16a34a";
const P95: &str = "#d97706";
const P99: &str = "#9333ea";
const MARK: &str = "#6b7280";

/// One chart: its series as (name, colour, values), the unit of its axis.
struct Chart<'a> {
    id: String,
    title: &'a str,
    unit: &'a str,
    series: Vec<(&'a str, &'a str, Vec<Option<f64>>)>,
}

/// The request rate and error rate chart, and the latency chart, of `points` over `span`,
/// with `marks`; `id` prefixes the charts' element ids.
pub fn charts(id: &str, points: &[Point], span: Span, marks: &[Mark]) -> String {
    let rates = Chart {
        id: format!("{id}-rate"),
        title: "requests/s and errors/s",
        unit: "/s",
        series: vec![
            (
                "requests/s",
                REQUESTS,
                points.iter().map(|p| Some(p.requests_per_second)).collect(),
            ),
            (
                "errors/s",
                ERRORS,
                points.iter().map(|p| Some(p.errors_per_second)).collect(),
            ),
        ],
    };
    let ms = |f: fn(&Point) -> Option<f64>| points.iter().map(move |p| f(p).map(|s| s * 1000.0));
    let latency = Chart {
        id: format!("{id}-latency"),
        title: "upstream response time p50, p95, p99",
        unit: "ms",
        series: vec![
            ("p50", P50, ms(|p| p.p50).collect()),
            ("p95", P95, ms(|p| p.p95).collect()),
            ("p99", P99, ms(|p| p.p99).collect()),
        ],
    };
    let mut out = String::new();
    for chart in [rates, latency] {
        draw(&mut out, &chart, points, span, marks);
    }
    out
}

fn draw(out: &mut String, chart: &Chart, points: &[Point], span: Span, marks: &[Mark]) {
    let start = points.first().map(|p| p.start).unwrap_or(0);
    let end = points.last().map(|p| p.start + span.seconds).unwrap_or(1);
    let max = chart
        .series
        .iter()
        .flat_map(|(_, _, v)| v.iter().flatten())
        .fold(0.0f64, |a, b| a.max(*b));
    let top = nice_ceiling(max);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |t: f64| LEFT + (t - start as f64) / (end - start).max(1) as f64 * plot_w;
    let y = |v: f64| TOP + plot_h - v / top * plot_h;
    let _ = write!(
        out,
        "<svg class=\"plot\" id=\"{}\" role=\"img\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         xmlns=\"http://www.w3.org/2000/svg\" font-family=\"sans-serif\" \
         font-size=\"10\"><title>{}</title>",
        chart.id, chart.title
    );
    // Axes and grid: 0, half and the top of the scale.
    for f in [0.0, 0.5, 1.0] {
        let v = top * f;
        let _ = write!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#e5e7eb\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#6b7280\">{} {}</text>",
            WIDTH - RIGHT,
            y(v),
            y(v),
            LEFT - 4.0,
            y(v) + 3.0,
            number(v),
            chart.unit
        );
    }
    // Time labels: the start, the middle and now.
    let total = end - start;
    for (f, anchor) in [(0.0, "start"), (0.5, "middle"), (1.0, "end")] {
        let ago = total as f64 * (1.0 - f);
        let label = if f == 1.0 {
            "now".to_string()
        } else {
            format!("-{}", ago_label(ago as u64))
        };
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\" fill=\"#6b7280\">{label}</text>",
            LEFT + f * plot_w,
            HEIGHT - 6.0
        );
    }
    // The app's events inside the span.
    for m in marks.iter().filter(|m| m.at >= start && m.at < end) {
        let mx = x(m.at as f64);
        let _ = write!(
            out,
            "<g class=\"mark\" data-kind=\"{kind}\"><title>{kind}: {detail}</title>\
             <line x1=\"{mx:.1}\" x2=\"{mx:.1}\" y1=\"{TOP}\" y2=\"{:.1}\" stroke=\"{MARK}\" \
             stroke-dasharray=\"3,2\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"{MARK}\">{letter}</text></g>",
            TOP + plot_h,
            mx + 2.0,
            TOP + 8.0,
            kind = m.kind,
            detail = escape(&m.detail),
            letter = match m.kind {
                "deploy" => "D",
                "deploy failed" => "F",
                "health replacement" => "H",
                _ => "R",
            }
        );
    }
    let step = span.seconds as f64;
    for (name, colour, values) in &chart.series {
        let mut path = String::new();
        let mut pen_down = false;
        for (p, v) in points.iter().zip(values) {
            match v {
                Some(v) => {
                    let cmd = if pen_down { 'L' } else { 'M' };
                    let _ = write!(
                        path,
                        "{cmd}{:.1} {:.1}",
                        x(p.start as f64 + step / 2.0),
                        y(*v)
                    );
                    pen_down = true;
                }
                None => pen_down = false,
            }
        }
        // A point without a neighbour draws no line: a dot shows it.
        for (i, (p, v)) in points.iter().zip(values).enumerate() {
            let alone =
                |j: Option<usize>| j.and_then(|j| values.get(j)).is_none_or(|v| v.is_none());
            if let Some(v) = v
                && alone(i.checked_sub(1))
                && alone(Some(i + 1))
            {
                let _ = write!(
                    out,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\" fill=\"{colour}\"/>",
                    x(p.start as f64 + step / 2.0),
                    y(*v)
                );
            }
        }
        let drawn = values.iter().flatten().count();
        let _ = write!(
            out,
            "<path class=\"series\" data-series=\"{name}\" data-points=\"{drawn}\" d=\"{path}\" \
             fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\"/>"
        );
    }
    // Legend, top right.
    let mut lx = WIDTH - RIGHT - 70.0 * chart.series.len() as f64;
    for (name, colour, _) in &chart.series {
        let _ = write!(
            out,
            "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"10\" height=\"3\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#374151\">{name}</text>",
            TOP + 2.0,
            lx + 13.0,
            TOP + 6.0
        );
        lx += 70.0;
    }
    out.push_str("</svg>");
}

/// A small line of the request rate per minute over the last hour, for the app list.
pub fn sparkline(hour: &[Point]) -> String {
    let per_minute: Vec<f64> = hour
        .chunks(6)
        .map(|c| c.iter().map(|p| p.requests_per_second).sum::<f64>() / c.len() as f64)
        .collect();
    let (w, h) = (120.0, 24.0);
    let max = per_minute.iter().fold(0.0f64, |a, b| a.max(*b));
    let top = if max > 0.0 { max } else { 1.0 };
    let n = per_minute.len().max(2) - 1;
    let mut points = String::new();
    for (i, v) in per_minute.iter().enumerate() {
        let _ = write!(
            points,
            "{:.1},{:.1} ",
            i as f64 / n as f64 * w,
            h - 1.0 - v / top * (h - 2.0)
        );
    }
    let last = per_minute.iter().rev().nth(1).copied().unwrap_or(0.0);
    format!(
        "<svg class=\"spark\" role=\"img\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" \
         xmlns=\"http://www.w3.org/2000/svg\"><title>requests/s, last hour (peak {}, last minute {})</title>\
         <polyline data-points=\"{}\" points=\"{}\" fill=\"none\" stroke=\"{REQUESTS}\" stroke-width=\"1.2\"/></svg>",
        number(max),
        number(last),
        per_minute.len(),
        points.trim_end()
    )
}

/// The smallest of 1, 2, 5 times a power of ten at least `v` (1 for nothing).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

fn number(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{:.1}", v).trim_end_matches(".0").to_string()
    } else {
        format!("{v:.2}")
    }
}

fn ago_label(secs: u64) -> String {
    if secs >= 3600 {
        format!("{}h", secs / 3600)
    } else {
        format!("{}m", secs / 60)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(n: usize) -> Vec<Point> {
        (0..n as u64)
            .map(|i| Point {
                start: 1000 + i * 10,
                requests_per_second: i as f64,
                errors_per_second: 0.0,
                p50: (i % 2 == 0).then_some(0.02),
                p95: Some(0.2),
                p99: None,
            })
            .collect()
    }

    #[test]
    fn charts_draw_every_series_and_escape_marks() {
        let marks = [Mark {
            at: 1015,
            kind: "deploy",
            detail: "<script>x</script>".into(),
        }];
        let svg = charts("hour", &points(6), super::super::HOUR, &marks);
        assert_eq!(svg.matches("<svg").count(), 2);
        assert!(svg.contains("data-series=\"requests/s\" data-points=\"6\""));
        assert!(svg.contains("data-series=\"p50\" data-points=\"3\""));
        assert!(svg.contains("data-series=\"p99\" data-points=\"0\""));
        assert!(svg.contains("&lt;script&gt;"), "{svg}");
        assert!(!svg.contains("<script"));
        assert!(!svg.contains("style="));
    }

    #[test]
    fn each_kind_of_event_has_its_letter() {
        let mark = |kind| Mark {
            at: 1015,
            kind,
            detail: String::new(),
        };
        for (kind, letter) in [
            ("deploy", "D"),
            ("deploy failed", "F"),
            ("restart", "R"),
            ("health replacement", "H"),
        ] {
            let svg = charts("hour", &points(6), super::super::HOUR, &[mark(kind)]);
            assert!(
                svg.contains(&format!(">{letter}</text></g>")),
                "{kind}: {svg}"
            );
        }
    }

    #[test]
    fn sparkline_per_minute() {
        let s = sparkline(&points(360));
        assert!(s.contains("data-points=\"60\""), "{s}");
        assert!(!s.contains("NaN"));
    }

    #[test]
    fn scales() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(120.0), 200.0);
    }
}
