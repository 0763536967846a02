//! A flame graph as an SVG document, drawn from stacks in the folded format
//! ([`crate::profile::folded`]): each function a box as wide as its share of all the counts,
//! the functions it called stacked on it, the outermost at the bottom, as Brendan Gregg's
//! `flamegraph.pl` draws them. Hovering a box shows the function, its count and its share (an
//! SVG `<title>`, no script). Drawn here rather than with inferno, whose CDDL licence the
//! dependency policy (`deny.toml`) does not allow: boxes and labels are all it takes.

use std::fmt::Write as _;

const WIDTH: f64 = 1200.0;
const PAD: f64 = 10.0;
const FRAME: f64 = 16.0;
const HEADER: f64 = 48.0;
/// A label's character, at the 12-pixel font below, for deciding what fits in a box.
const CHAR: f64 = 7.0;
/// Narrower boxes are not drawn (their share is in their caller's).
const MIN_WIDTH: f64 = 0.3;

/// A box of the graph: the function, how deep (0: the whole, under every stack), and where
/// it starts and how wide it is, as fractions of the whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub name: String,
    pub depth: usize,
    pub count: u64,
    pub start: f64,
    pub share: f64,
}

#[derive(Default)]
struct Node {
    name: String,
    count: u64,
    children: Vec<Node>,
}

impl Node {
    fn child(&mut self, name: &str) -> &mut Node {
        let i = match self.children.iter().position(|c| c.name == name) {
            Some(i) => i,
            None => {
                self.children.push(Node {
                    name: name.to_string(),
                    ..Node::default()
                });
                self.children.len() - 1
            }
        };
        &mut self.children[i]
    }
}

/// The boxes of `folded` (lines `outer;…;inner <count>`; a line without a count is skipped),
/// callers before callees, siblings in the order of their names as `flamegraph.pl` sorts them.
pub fn layout(folded: &str) -> Vec<Frame> {
    let mut root = Node {
        name: "all".to_string(),
        ..Node::default()
    };
    for line in folded.lines() {
        let Some((stack, count)) = line.trim_end().rsplit_once(' ') else {
            continue;
        };
        let Ok(count) = count.parse::<u64>() else {
            continue;
        };
        root.count += count;
        let mut node = &mut root;
        for name in stack.split(';').filter(|n| !n.is_empty()) {
            node = node.child(name);
            node.count += count;
        }
    }
    let mut frames = Vec::new();
    if root.count > 0 {
        place(&root, 0, 0.0, root.count as f64, &mut frames);
    }
    frames
}

fn place(node: &Node, depth: usize, start: f64, total: f64, out: &mut Vec<Frame>) {
    out.push(Frame {
        name: node.name.clone(),
        depth,
        count: node.count,
        start: start / total,
        share: node.count as f64 / total,
    });
    let mut children: Vec<&Node> = node.children.iter().collect();
    children.sort_by(|a, b| a.name.cmp(&b.name));
    let mut at = start;
    for child in children {
        place(child, depth + 1, at, total, out);
        at += child.count as f64;
    }
}

/// The flame graph of `folded` as an SVG document, `title` above it; `unit` names what the
/// counts count (in the boxes' titles).
pub fn svg(folded: &str, title: &str, unit: &str) -> String {
    let frames = layout(folded);
    let total = frames.first().map_or(0, |f| f.count);
    let depth = frames.iter().map(|f| f.depth).max().unwrap_or(0) + 1;
    let height = HEADER + depth as f64 * FRAME + PAD;
    let inner = WIDTH - 2.0 * PAD;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="Verdana, sans-serif" font-size="12">
<rect width="100%" height="100%" fill="#f8f8f0"/>
<text x="{x}" y="20" font-size="16" text-anchor="middle">{title}</text>
<text x="{x}" y="38" fill="#555" text-anchor="middle">{total} {unit} in all; hover a box for its own</text>"##,
        x = WIDTH / 2.0,
        title = escape(title),
        unit = escape(unit),
    );
    for f in &frames {
        let w = f.share * inner;
        if w < MIN_WIDTH {
            continue;
        }
        let x = PAD + f.start * inner;
        let y = height - PAD - (f.depth as f64 + 1.0) * FRAME;
        let _ = write!(
            out,
            r#"<g><title>{name}: {count} {unit} ({pct:.2} %)</title><rect x="{x:.2}" y="{y}" width="{w:.2}" height="{h}" rx="2" fill="{fill}"/>"#,
            name = escape(&f.name),
            count = f.count,
            unit = escape(unit),
            pct = f.share * 100.0,
            h = FRAME - 1.0,
            fill = color(&f.name),
        );
        let fits = ((w - 6.0) / CHAR).floor().max(0.0) as usize;
        if fits >= 3 {
            let short = short(&f.name);
            let label: String = if short.chars().count() <= fits {
                short.to_string()
            } else {
                short.chars().take(fits - 2).chain("..".chars()).collect()
            };
            let _ = write!(
                out,
                r#"<text x="{tx:.2}" y="{ty}">{label}</text>"#,
                tx = x + 3.0,
                ty = y + FRAME - 4.5,
                label = escape(&label),
            );
        }
        out.push_str("</g>\n");
    }
    out.push_str("</svg>\n");
    out
}

/// What a box's label shows of a Rust path (its title has it whole): the type and the
/// function, `Http::on_http_request_headers` for `<idempotency::filter::Http as
/// proxy_wasm::traits::HttpContext>::on_http_request_headers`, `scope::digest` for
/// `idempotency::scope::digest`.
fn short(name: &str) -> String {
    if let (Some(rest), Some(end)) = (name.strip_prefix('<'), name.rfind(">::"))
        && let Some((ty, _)) = rest.split_once(" as ")
    {
        let ty = ty.rsplit("::").next().unwrap_or(ty);
        return format!("{ty}::{}", &name[end + 3..]);
    }
    // The last two segments, splitting only outside `<…>`.
    let (mut depth, mut cuts) = (0i32, Vec::new());
    for (i, c) in name.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            ':' if depth == 0 && name[i..].starts_with("::") => cuts.push(i),
            _ => {}
        }
    }
    match cuts.len() {
        0 | 1 => name.to_string(),
        n => name[cuts[n - 2] + 2..].to_string(),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `flamegraph.pl`'s "hot" palette, from a hash of the name, so a function has the same colour
/// in every graph.
fn color(name: &str) -> String {
    // FNV-1a: stable across runs and builds, unlike std's hasher.
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let v = |shift: u32| f64::from((h >> shift) & 0xff) / 255.0;
    format!(
        "rgb({},{},{})",
        205 + (50.0 * v(0)) as u32,
        (230.0 * v(8)) as u32,
        (55.0 * v(16)) as u32
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame<'a>(frames: &'a [Frame], name: &str) -> &'a Frame {
        frames.iter().find(|f| f.name == name).unwrap()
    }

    #[test]
    fn boxes_are_as_wide_as_their_counts_and_stacked_on_their_callers() {
        let frames = layout("a;b 30\na;c 10\nd 60\na;b 0\n");
        assert_eq!(frames[0].name, "all");
        assert_eq!(frames[0].count, 100);
        let (a, b, c, d) = (
            frame(&frames, "a"),
            frame(&frames, "b"),
            frame(&frames, "c"),
            frame(&frames, "d"),
        );
        assert_eq!((a.depth, a.count, a.start, a.share), (1, 40, 0.0, 0.4));
        assert_eq!((d.depth, d.start, d.share), (1, 0.4, 0.6));
        assert_eq!((b.depth, b.start, b.share), (2, 0.0, 0.3));
        assert_eq!((c.depth, c.start, c.share), (2, 0.3, 0.1));
    }

    #[test]
    fn the_same_function_under_two_callers_is_two_boxes() {
        let frames = layout("x;f 5\ny;f 5\n");
        let fs: Vec<&Frame> = frames.iter().filter(|f| f.name == "f").collect();
        assert_eq!(fs.len(), 2);
        assert_eq!((fs[0].start, fs[1].start), (0.0, 0.5));
    }

    #[test]
    fn lines_without_a_count_are_skipped() {
        assert!(layout("").is_empty());
        assert!(layout("a;b\nc x\n").is_empty());
        assert_eq!(layout("a;b\n<a> as b::c 7\n")[1].name, "<a> as b::c");
    }

    #[test]
    fn the_document_escapes_names_and_labels_what_fits() {
        let doc = svg(
            "<F as Tr>::call&go 900\nshort 100\n",
            "fuel & more",
            "instructions",
        );
        assert!(doc.starts_with("<?xml"));
        assert!(doc.trim_end().ends_with("</svg>"));
        assert!(doc.contains("fuel &amp; more"));
        assert!(doc.contains("1000 instructions in all"));
        assert!(
            doc.contains("<title>&lt;F as Tr&gt;::call&amp;go: 900 instructions (90.00 %)</title>")
        );
        assert!(doc.contains(">short</text>"));
        assert!(!doc.contains("<F"));
        // Three boxes: the whole and its two callees.
        assert_eq!(doc.matches("<rect x=").count(), 3);
    }

    #[test]
    fn labels_keep_the_type_and_the_function() {
        assert_eq!(
            short(
                "<idempotency::filter::Http as proxy_wasm::traits::HttpContext>::on_http_request_headers"
            ),
            "Http::on_http_request_headers"
        );
        assert_eq!(short("idempotency::scope::digest"), "scope::digest");
        assert_eq!(
            short("alloc::raw_vec::RawVec<T,A>::grow_one"),
            "RawVec<T,A>::grow_one"
        );
        assert_eq!(short("proxy_on_tick"), "proxy_on_tick");
        assert_eq!(short("sha2::compress256"), "sha2::compress256");
        assert_eq!(
            short("core::ptr::drop_in_place<idempotency::json::Json>"),
            "ptr::drop_in_place<idempotency::json::Json>"
        );
        let doc = svg("idempotency::scope::digest 1\n", "t", "u");
        assert!(doc.contains(">scope::digest</text>"));
        assert!(doc.contains("<title>idempotency::scope::digest: 1 u"));
    }

    #[test]
    fn a_label_too_long_for_its_box_is_cut() {
        let long = "f".repeat(400);
        let doc = svg(&format!("{long} 1\n"), "t", "u");
        assert!(!doc.contains(&format!(">{long}<")));
        assert!(doc.contains("..</text>"));
    }
}
