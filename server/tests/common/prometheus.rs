//! A strict reader of Prometheus's text exposition format (version 0.0.4), for the tests of
//! what the backend serves at `/metrics` and of what the test host renders as Kong's and
//! Envoy's metrics (`tests/` includes this file): every line must be a comment, a `# HELP`, a
//! `# TYPE` or a sample of the family its `# TYPE` announced; names and labels must be valid;
//! a family must not come twice; a histogram's buckets must be cumulative and end with
//! `+Inf` equal to its `_count`. With `promtool` on `PATH`, [`promtool_check`] runs Prometheus's
//! own linter on it too.

#![allow(dead_code)]

use std::collections::BTreeMap;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One metric family: its `# TYPE`, `# HELP` and samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

/// A whole exposition.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Exposition {
    pub families: Vec<Family>,
}

impl Exposition {
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// The value of the sample `name` with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.families
            .iter()
            .flat_map(|f| &f.samples)
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }

    /// Every sample's name.
    pub fn sample_names(&self) -> Vec<&str> {
        self.families
            .iter()
            .flat_map(|f| &f.samples)
            .map(|s| s.name.as_str())
            .collect()
    }
}

fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

fn valid_label(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text.parse().map_err(|_| format!("not a value: {text:?}")),
    }
}

/// `{a="1",b="x\"y"}` after the name; returns the labels and what follows the `}`.
fn labels(mut rest: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    rest = rest.strip_prefix('{').ok_or("expected {")?;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("a label without =")?;
        let name = &rest[..eq];
        if !valid_label(name) {
            return Err(format!("not a label name: {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("a label value without quotes")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("a bad escape {other:?}")),
                },
                Some((i, '"')) => break i,
                Some((_, '\n')) | None => return Err("an unterminated label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("the label {name} twice"));
        }
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// The family a sample name belongs to, given the family being read.
fn belongs(sample: &str, family: &Family) -> bool {
    let suffixes: &[&str] = match family.kind.as_str() {
        "histogram" => &["_bucket", "_sum", "_count"],
        "summary" => &["_sum", "_count", ""],
        _ => &[""],
    };
    suffixes
        .iter()
        .any(|s| sample.strip_suffix(s) == Some(family.name.as_str()))
        || (family.kind != "histogram" && sample == family.name)
}

/// Reads `text`, or says which line is wrong and why.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut exposition = Exposition::default();
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the last line does not end with a line feed".into());
    }
    for (n, line) in text.lines().enumerate() {
        let fail = |why: String| format!("line {}: {why}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !valid_name(name) {
                        return Err(fail("not a metric name".into()));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(fail(format!("not a type: {kind}")));
                    }
                    match exposition.families.last_mut() {
                        // Its HELP came first.
                        Some(f) if f.name == name && f.kind.is_empty() && f.samples.is_empty() => {
                            f.kind = kind.to_owned();
                        }
                        _ => {
                            if exposition.family(name).is_some() {
                                return Err(fail("a family twice".into()));
                            }
                            exposition.families.push(Family {
                                name: name.to_owned(),
                                kind: kind.to_owned(),
                                help: None,
                                samples: Vec::new(),
                            });
                        }
                    }
                }
                (Some("HELP"), Some(name), help) => {
                    if !valid_name(name) {
                        return Err(fail("not a metric name".into()));
                    }
                    match exposition.families.last_mut() {
                        Some(f) if f.name == name && f.samples.is_empty() && f.help.is_none() => {
                            f.help = Some(help.unwrap_or_default().to_owned());
                        }
                        _ => {
                            if exposition.family(name).is_some() {
                                return Err(fail("a family twice".into()));
                            }
                            exposition.families.push(Family {
                                name: name.to_owned(),
                                kind: String::new(),
                                help: Some(help.unwrap_or_default().to_owned()),
                                samples: Vec::new(),
                            });
                        }
                    }
                }
                (Some("TYPE" | "HELP"), _, _) => return Err(fail("a malformed comment".into())),
                _ => {} // another comment
            }
            continue;
        }
        let end = line
            .find(['{', ' '])
            .ok_or_else(|| fail("no value".into()))?;
        let name = &line[..end];
        if !valid_name(name) {
            return Err(fail("not a metric name".into()));
        }
        let (labels, rest) = if line[end..].starts_with('{') {
            labels(&line[end..]).map_err(fail)?
        } else {
            (BTreeMap::new(), &line[end..])
        };
        let mut fields = rest.split_whitespace();
        let value = value(fields.next().ok_or_else(|| fail("no value".into()))?).map_err(fail)?;
        if let Some(timestamp) = fields.next()
            && timestamp.parse::<i64>().is_err()
        {
            return Err(fail("not a timestamp".into()));
        }
        if fields.next().is_some() {
            return Err(fail("more than a value and a timestamp".into()));
        }
        let family = match exposition.families.last_mut() {
            Some(f) if !f.kind.is_empty() && belongs(name, f) => f,
            _ => {
                return Err(fail(
                    "a sample outside the family its TYPE announced".into(),
                ));
            }
        };
        family.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    for family in &exposition.families {
        if family.kind.is_empty() {
            return Err(format!("{}: HELP without TYPE", family.name));
        }
        if family.kind == "counter" && family.samples.iter().any(|s| s.value < 0.0) {
            return Err(format!("{}: a negative counter", family.name));
        }
        if family.kind == "histogram" {
            check_histogram(family)?;
        }
    }
    Ok(exposition)
}

/// A series' labels, as a sortable key.
type LabelSet = Vec<(String, String)>;

/// Per label set: buckets cumulative, the last `+Inf`, equal to `_count`.
fn check_histogram(family: &Family) -> Result<(), String> {
    // Per label set (without `le`): each bucket's bound and count.
    let mut series: BTreeMap<LabelSet, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts: BTreeMap<LabelSet, f64> = BTreeMap::new();
    for sample in &family.samples {
        let mut labels = sample.labels.clone();
        if sample.name.ends_with("_bucket") {
            let le = labels
                .remove("le")
                .ok_or_else(|| format!("{}: a bucket without le", family.name))?;
            series
                .entry(labels.into_iter().collect())
                .or_default()
                .push((value(&le)?, sample.value));
        } else if sample.name.ends_with("_count") {
            counts.insert(labels.into_iter().collect(), sample.value);
        }
    }
    for (labels, buckets) in &series {
        if buckets
            .windows(2)
            .any(|w| w[1].0 <= w[0].0 || w[1].1 < w[0].1)
        {
            return Err(format!(
                "{} {labels:?}: buckets not cumulative",
                family.name
            ));
        }
        match buckets.last() {
            Some((le, n)) if le.is_infinite() && Some(n) == counts.get(labels) => {}
            _ => return Err(format!("{} {labels:?}: +Inf is not the count", family.name)),
        }
    }
    Ok(())
}

/// Runs `promtool check metrics` on `text` when promtool is on `PATH`: `None` when it is not
/// (the caller says the check was skipped), else its verdict (`Err` with what it said).
pub fn promtool_check(text: &str) -> Option<Result<(), String>> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("promtool reads its input");
    let output = child.wait_with_output().expect("promtool ends");
    Some(if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    })
}
