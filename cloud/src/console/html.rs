//! HTML building for the console: one escaping function every interpolated string goes
//! through, the page layout, and small SVG charts. Plain `format!` with [`esc`] rather
//! than a template engine: the pages are few and small, and one visible escaping rule
//! is easier to audit than template auto-escaping rules.

use std::fmt::Write;

/// Escapes text for HTML element content and double-quoted attribute values. Every
/// string that comes from a device, a chute, a token name or a request goes through it.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a path segment or query value.
pub fn url(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Who is signed in, for the page header.
pub struct Who<'a> {
    pub name: &'a str,
    pub role: &'a str,
    pub csrf: &'a str,
}

/// A whole page: header with navigation and the sign-out form, `body`, and the one
/// script (an ES module served by this binary; no inline script anywhere).
pub fn page(title: &str, who: Option<&Who<'_>>, body: &str) -> String {
    let mut nav = String::new();
    if let Some(w) = who {
        let _ = write!(
            nav,
            r#"<nav aria-label="Console"><a href="/devices">Devices</a> <a href="/deploy">Deploy</a> <a href="/commands">Commands</a> <a href="/keys">Keys</a></nav>
<form method="post" action="/signout" class="signout"><span>Signed in as {} ({})</span> <input type="hidden" name="csrf" value="{}"><button type="submit">Sign out</button></form>"#,
            esc(w.name),
            esc(w.role),
            esc(w.csrf)
        );
    }
    let csrf = who.map_or(String::new(), |w| esc(w.csrf));
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{csrf}">
<title>{title} · chute-cloud</title>
<link rel="stylesheet" href="/assets/console.css">
<script type="module" src="/assets/console.js"></script>
</head>
<body>
<header><strong class="brand">chute-cloud</strong> {nav}</header>
<main>
<h1>{title}</h1>
<p id="status" role="status" aria-live="polite"></p>
{body}
</main>
<dialog id="confirm" aria-labelledby="confirm-title">
<h2 id="confirm-title">Sign this command?</h2>
<p>Decoded in this browser from the exact bytes your key will sign:</p>
<ul id="confirm-what"></ul>
<button type="button" id="confirm-yes">Sign and send</button> <button type="button" id="confirm-no">Cancel</button>
</dialog>
</body>
</html>
"#,
        title = esc(title),
    )
}

/// A small line chart of `points` (x in seconds ago, up to 3600; y values) against an
/// optional cap drawn as a dashed line. Presentation attributes only (the CSP forbids
/// inline styles).
pub fn chart(label: &str, points: &[(f64, f64)], cap: Option<f64>, unit: &str) -> String {
    const W: f64 = 240.0;
    const H: f64 = 48.0;
    let max = points
        .iter()
        .map(|p| p.1)
        .chain(cap)
        .fold(0.0f64, f64::max)
        .max(1e-9);
    // The x axis spans the history there is (at least a minute, at most the hour), so
    // a device that just connected shows its first minutes rather than a flat corner.
    let span = points
        .iter()
        .map(|p| p.0)
        .fold(60.0f64, f64::max)
        .min(3600.0);
    let mut line = String::new();
    for (x, y) in points {
        let px = W - (x / span * W).clamp(0.0, W);
        let py = H - (y / max * (H - 2.0)).clamp(0.0, H);
        let _ = write!(line, "{px:.1},{py:.1} ");
    }
    let cap_line = cap.map_or(String::new(), |c| {
        let py = H - (c / max * (H - 2.0));
        format!(
            r##"<line x1="0" x2="{W}" y1="{py:.1}" y2="{py:.1}" stroke="#b00" stroke-dasharray="4 3"/>"##
        )
    });
    let window = if span >= 120.0 {
        format!("last {:.0} min", span / 60.0)
    } else {
        format!("last {span:.0} s")
    };
    let last = points.last().map_or("no samples yet".to_owned(), |p| {
        format!("{window}, now {}", human(p.1, unit))
    });
    let cap_txt = cap.map_or(String::new(), |c| format!(", cap {}", human(c, unit)));
    format!(
        r##"<figure class="chart"><svg role="img" aria-label="{l}: {last}{cap_txt}" viewBox="0 0 {W} {H}" width="{W}" height="{H}"><rect width="{W}" height="{H}" fill="#f6f6f6"/>{cap_line}<polyline fill="none" stroke="#036" stroke-width="1.5" points="{line}"/></svg><figcaption>{l}: {last}{cap_txt}</figcaption></figure>"##,
        l = esc(label),
        last = esc(&last),
        cap_txt = esc(&cap_txt),
    )
}

/// A value with its unit, readable: bytes as MiB, rates as kbit/s, CPU as millicores.
pub fn human(v: f64, unit: &str) -> String {
    match unit {
        "bytes" => format!("{:.1} MiB", v / 1048576.0),
        "bps" => format!("{:.1} kbit/s", v / 1000.0),
        "m" => format!("{v:.0}m CPU"),
        _ => format!("{v:.0}"),
    }
}

/// "5 s ago", "3 min ago" from an age in seconds.
pub fn age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s => format!("{} h ago", s / 3600),
    }
}

/// Unix seconds as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn time(t: i64) -> String {
    let days = t.div_euclid(86400);
    let secs = t.rem_euclid(86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_strings_become_text() {
        assert_eq!(
            esc(r#"<img src=x onerror="alert(1)">'"#),
            "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&#39;"
        );
        assert_eq!(
            esc("<script>a&b</script>"),
            "&lt;script&gt;a&amp;b&lt;/script&gt;"
        );
    }

    #[test]
    fn times_and_urls() {
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(1_767_225_600), "2026-01-01 00:00:00");
        assert_eq!(url("a b/<c>"), "a%20b%2F%3Cc%3E");
    }
}
