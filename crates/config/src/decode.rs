//! Decoding helpers with fly.toml's tolerances: every helper records an error (with line and key)
//! and returns `None` instead of failing, so one pass reports every problem in the file.

use std::collections::BTreeMap;
use std::ops::Range;

use aloft_api::Duration;

use crate::diag::{Diagnostic, Origin};
use crate::node::{Key, LineIndex, Node, Value};

/// Decoding state: the source (for line numbers) and what was found so far.
#[derive(Debug)]
pub(crate) struct Ctx<'s> {
    src: &'s str,
    lines: LineIndex,
    pub(crate) errors: Vec<Diagnostic>,
    pub(crate) warnings: Vec<Diagnostic>,
}

/// How an integer given for a duration is read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum IntUnit {
    Seconds,
    Millis,
}

/// `path.key`, with the key quoted as TOML would need it (`env."A=B"`).
pub(crate) fn join(path: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let key = if bare { key.to_owned() } else { format!("{key:?}") };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

pub(crate) fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

impl<'s> Ctx<'s> {
    pub(crate) fn new(src: &'s str) -> Self {
        Self {
            src,
            lines: LineIndex::new(src),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Line, column and key of a span.
    pub(crate) fn origin(&self, span: &Range<usize>, path: &str) -> Origin {
        let (line, column) = self.lines.locate(self.src, span.start);
        Origin {
            line,
            column,
            key: path.to_owned(),
        }
    }

    pub(crate) fn error(&mut self, span: &Range<usize>, path: &str, message: impl Into<String>) {
        let origin = self.origin(span, path);
        self.errors.push(Diagnostic {
            origin,
            message: message.into(),
        });
    }

    pub(crate) fn warn(&mut self, span: &Range<usize>, path: &str, message: impl Into<String>) {
        let origin = self.origin(span, path);
        self.warnings.push(Diagnostic {
            origin,
            message: message.into(),
        });
    }

    /// An error at a known origin (validation after decoding).
    pub(crate) fn error_at(&mut self, origin: &Origin, message: impl Into<String>) {
        self.errors.push(Diagnostic {
            origin: origin.clone(),
            message: message.into(),
        });
    }

    /// A warning at a known origin.
    pub(crate) fn warn_at(&mut self, origin: &Origin, message: impl Into<String>) {
        self.warnings.push(Diagnostic {
            origin: origin.clone(),
            message: message.into(),
        });
    }

    /// Warns about a key aloft does not know, suggesting a close known key.
    pub(crate) fn unknown(&mut self, key: &Key, path: &str, known: &[&str]) {
        let hint = known
            .iter()
            .filter(|k| edit_distance(k, &key.name) <= 2)
            .min_by_key(|k| edit_distance(k, &key.name))
            .map(|k| format!(" (did you mean `{k}`?)"))
            .unwrap_or_default();
        self.warn(&key.span, path, format!("unknown key, ignored{hint}"));
    }

    /// Warns about a key flyctl accepts but that has no effect on machines.
    pub(crate) fn legacy(&mut self, key: &Key, path: &str, why: &str) {
        self.warn(&key.span, path, format!("ignored: {why}"));
    }

    fn wrong_type(&mut self, node: &Node, path: &str, expected: &str) {
        let found = node.value.describe();
        self.error(&node.span, path, format!("expected {expected}, found {found}"));
    }

    /// The entries of a table.
    pub(crate) fn table<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [(Key, Node)]> {
        match &node.value {
            Value::Table(entries) => Some(entries),
            Value::Array(items) if !items.is_empty() && items.iter().all(Node::is_table) => {
                self.error(
                    &node.span,
                    path,
                    format!(
                        "expected a single table, found an array of tables; write [{}] instead of [[{}]]",
                        strip_indices(path),
                        strip_indices(path)
                    ),
                );
                None
            }
            _ => {
                self.wrong_type(node, path, "a table");
                None
            }
        }
    }

    /// A table or an array of tables, as a list of (table, path) — fly.toml accepts both for
    /// `[[vm]]`, `[[services]]`, `[[mounts]]`, `[[metrics]]`, checks …
    pub(crate) fn tables<'n>(&mut self, node: &'n Node, path: &str) -> Vec<(&'n Node, String)> {
        match &node.value {
            Value::Table(_) => vec![(node, path.to_owned())],
            Value::Array(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let p = index(path, i);
                    if item.is_table() {
                        out.push((item, p));
                    } else {
                        self.wrong_type(item, &p, "a table");
                    }
                }
                out
            }
            _ => {
                self.wrong_type(node, path, "a table or an array of tables");
                Vec::new()
            }
        }
    }

    /// A string. Numbers and booleans are not accepted (flyctl doesn't either), except through
    /// [`Ctx::string_lenient`].
    pub(crate) fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            Value::Str(s) => Some(s.clone()),
            _ => {
                self.wrong_type(node, path, "a string");
                None
            }
        }
    }

    /// A string; integers, floats and booleans are turned into their text (env values, sizes).
    pub(crate) fn string_lenient(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            Value::Str(s) => Some(s.clone()),
            Value::Int(Ok(i)) => Some(i.to_string()),
            Value::Int(Err(text)) => Some(text.clone()),
            Value::Float(f) => Some(f.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Datetime(d) => Some(d.clone()),
            _ => {
                self.wrong_type(node, path, "a string");
                None
            }
        }
    }

    /// An integer in the range of `T`; a string holding an integer (`"8080"`) and a float with no
    /// fractional part (`10.0`) are accepted, as flyctl does.
    pub(crate) fn int<T>(&mut self, node: &Node, path: &str) -> Option<T>
    where
        T: TryFrom<i64> + Bounded,
    {
        let value: Result<i64, ()> = match &node.value {
            Value::Int(Ok(i)) => Ok(*i),
            Value::Str(s) => s.trim().replace('_', "").parse::<i64>().map_err(|_| ()),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 =>
            {
                #[expect(clippy::cast_possible_truncation, reason = "integral and in range")]
                Ok(*f as i64)
            }
            _ => Err(()),
        };
        let Ok(value) = value else {
            self.wrong_type(node, path, "an integer");
            return None;
        };
        if let Ok(v) = T::try_from(value) {
            Some(v)
        } else {
            self.error(
                &node.span,
                path,
                format!(
                    "{value} is out of range; use a number from {} to {}",
                    T::MIN_TEXT,
                    T::MAX_TEXT
                ),
            );
            None
        }
    }

    /// A float; integers and numeric strings are accepted.
    pub(crate) fn float(&mut self, node: &Node, path: &str) -> Option<f64> {
        match &node.value {
            #[expect(clippy::cast_precision_loss, reason = "config values are small")]
            Value::Int(Ok(i)) => Some(*i as f64),
            Value::Float(f) if f.is_finite() => Some(*f),
            Value::Str(s) if s.trim().parse::<f64>().is_ok_and(f64::is_finite) => s.trim().parse().ok(),
            _ => {
                self.wrong_type(node, path, "a number");
                None
            }
        }
    }

    /// A boolean; the strings `"true"` and `"false"` are accepted.
    pub(crate) fn bool(&mut self, node: &Node, path: &str) -> Option<bool> {
        match &node.value {
            Value::Bool(b) => Some(*b),
            Value::Str(s) if s.eq_ignore_ascii_case("true") => Some(true),
            Value::Str(s) if s.eq_ignore_ascii_case("false") => Some(false),
            _ => {
                self.wrong_type(node, path, "true or false");
                None
            }
        }
    }

    /// A duration: a Go duration string (`"10s"`, `"1m30s"`) or an integer in `unit`.
    pub(crate) fn duration(&mut self, node: &Node, path: &str, unit: IntUnit) -> Option<Duration> {
        match &node.value {
            // flyctl treats an empty duration as unset.
            Value::Str(s) if s.trim().is_empty() => None,
            Value::Str(s) => match s.parse::<Duration>() {
                Ok(d) => Some(d),
                // A bare number in a string: same unit as an integer.
                Err(_) if s.trim().parse::<u64>().is_ok() => {
                    s.trim().parse::<u64>().ok().map(|n| int_duration(n, unit))
                }
                Err(e) => {
                    self.error(&node.span, path, e.to_string());
                    None
                }
            },
            Value::Int(Ok(i)) => match u64::try_from(*i) {
                Ok(n) => Some(int_duration(n, unit)),
                Err(_) => {
                    self.error(&node.span, path, "a duration can't be negative");
                    None
                }
            },
            _ => {
                let unit = match unit {
                    IntUnit::Seconds => "seconds",
                    IntUnit::Millis => "milliseconds",
                };
                self.wrong_type(
                    node,
                    path,
                    &format!("a duration such as \"10s\" or an integer number of {unit}"),
                );
                None
            }
        }
    }

    /// A list of strings; a single string is taken as a list of one.
    pub(crate) fn strings(&mut self, node: &Node, path: &str) -> Option<Vec<String>> {
        match &node.value {
            Value::Str(s) => Some(vec![s.clone()]),
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    out.push(self.string(item, &index(path, i))?);
                }
                Some(out)
            }
            _ => {
                self.wrong_type(node, path, "a list of strings");
                None
            }
        }
    }

    /// A command: a list of strings, or one string split like a shell would.
    pub(crate) fn command(&mut self, node: &Node, path: &str) -> Option<Vec<String>> {
        match &node.value {
            Value::Str(s) => self.split_command(s, &node.span, path),
            _ => self.strings(node, path),
        }
    }

    /// Splits a command line into words (quotes and backslashes as in a POSIX shell).
    pub(crate) fn split_command(&mut self, s: &str, span: &Range<usize>, path: &str) -> Option<Vec<String>> {
        if let Some(words) = shlex::split(s) {
            Some(words)
        } else {
            self.error(
                span,
                path,
                format!("can't split {s:?} into words: a quote is not closed or a backslash ends it"),
            );
            None
        }
    }

    /// A table of strings; values that are numbers or booleans become their text (flyctl does
    /// the same for `[env]`).
    pub(crate) fn string_map(&mut self, node: &Node, path: &str) -> Option<BTreeMap<String, String>> {
        let entries = self.table(node, path)?;
        let mut out = BTreeMap::new();
        for (key, value) in entries {
            let p = join(path, &key.name);
            if let Some(v) = self.string_lenient(value, &p) {
                out.insert(key.name.clone(), v);
            }
        }
        Some(out)
    }
}

fn int_duration(n: u64, unit: IntUnit) -> Duration {
    match unit {
        IntUnit::Seconds => Duration::from_secs(n),
        IntUnit::Millis => Duration::from_millis(n),
    }
}

/// `services[0].concurrency` → `services.concurrency`, for section names in messages.
pub(crate) fn strip_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut depth = 0usize;
    for c in path.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// Integer types with their range spelled out for messages.
pub(crate) trait Bounded {
    const MIN_TEXT: &'static str;
    const MAX_TEXT: &'static str;
}

impl Bounded for u16 {
    const MIN_TEXT: &'static str = "0";
    const MAX_TEXT: &'static str = "65535";
}

impl Bounded for u32 {
    const MIN_TEXT: &'static str = "0";
    const MAX_TEXT: &'static str = "4294967295";
}

impl Bounded for u64 {
    const MIN_TEXT: &'static str = "0";
    const MAX_TEXT: &'static str = "18446744073709551615";
}

/// Levenshtein distance, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(strip_indices("services[0].concurrency"), "services.concurrency");
        assert_eq!(edit_distance("internal_prot", "internal_port"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(join("", "app"), "app");
        assert_eq!(join("vm", "size"), "vm.size");
        assert_eq!(join("env", "A=B"), "env.\"A=B\"");
        assert_eq!(join("build", "build-target"), "build.build-target");
    }
}
