//! A spanned TOML tree: the document as `toml` parsed it, with byte spans on every key and value,
//! so decoding can point at the line and key of each mistake.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// A value and where it is in the source.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) span: Range<usize>,
    pub(crate) value: Value,
}

/// A TOML value.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    Str(String),
    /// Integers beyond i64 keep their text so the error can quote it.
    Int(Result<i64, String>),
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array(Vec<Node>),
    Table(Vec<(Key, Node)>),
}

/// A table key and where it is.
#[derive(Debug, Clone)]
pub(crate) struct Key {
    pub(crate) name: String,
    pub(crate) span: Range<usize>,
}

impl Value {
    /// What the value is, for messages ("a string", "an array of tables" …).
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Str(s) => format!("a string ({s:?})"),
            Self::Int(Ok(i)) => format!("an integer ({i})"),
            Self::Int(Err(text)) => format!("an integer ({text})"),
            Self::Float(f) => format!("a float ({f})"),
            Self::Bool(b) => format!("a boolean ({b})"),
            Self::Datetime(d) => format!("a date-time ({d})"),
            Self::Array(items) if !items.is_empty() && items.iter().all(Node::is_table) => {
                "an array of tables".to_owned()
            }
            Self::Array(_) => "an array".to_owned(),
            Self::Table(_) => "a table".to_owned(),
        }
    }
}

impl Node {
    pub(crate) fn is_table(&self) -> bool {
        matches!(self.value, Value::Table(_))
    }

    /// Converts a parsed document.
    pub(crate) fn from_document(doc: Spanned<DeTable<'_>>) -> Node {
        let span = doc.span();
        Node {
            span,
            value: Value::Table(convert_table(doc.into_inner())),
        }
    }

    /// The value as plain TOML, for keys aloft keeps verbatim (e.g. `[build] settings`).
    pub(crate) fn to_toml(&self) -> toml::Value {
        match &self.value {
            Value::Str(s) => toml::Value::String(s.clone()),
            Value::Int(Ok(i)) => toml::Value::Integer(*i),
            Value::Int(Err(text)) => toml::Value::String(text.clone()),
            Value::Float(f) => toml::Value::Float(*f),
            Value::Bool(b) => toml::Value::Boolean(*b),
            Value::Datetime(d) => toml::Value::String(d.clone()),
            Value::Array(items) => toml::Value::Array(items.iter().map(Node::to_toml).collect()),
            Value::Table(entries) => toml::Value::Table(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_toml()))
                    .collect(),
            ),
        }
    }
}

fn convert_table(table: DeTable<'_>) -> Vec<(Key, Node)> {
    let mut entries: Vec<(Key, Node)> = table
        .into_iter()
        .map(|(key, value)| {
            let key = Key {
                span: key.span(),
                name: key.into_inner().into_owned(),
            };
            (key, convert_value(value))
        })
        .collect();
    // Source order, so messages and expansions follow the file.
    entries.sort_by_key(|(k, _)| k.span.start);
    entries
}

fn convert_value(value: Spanned<DeValue<'_>>) -> Node {
    let span = value.span();
    let value = match value.into_inner() {
        DeValue::String(s) => Value::Str(s.into_owned()),
        DeValue::Integer(i) => {
            Value::Int(i64::from_str_radix(i.as_str(), i.radix()).map_err(|_| i.as_str().to_owned()))
        }
        DeValue::Float(f) => Value::Float(f.as_str().parse().unwrap_or(f64::NAN)),
        DeValue::Boolean(b) => Value::Bool(b),
        DeValue::Datetime(d) => Value::Datetime(d.to_string()),
        DeValue::Array(items) => Value::Array(items.iter().cloned().map(convert_value).collect::<Vec<_>>()),
        DeValue::Table(t) => Value::Table(convert_table(t)),
    };
    Node { span, value }
}

/// Byte offset → 1-based line and column.
#[derive(Debug)]
pub(crate) struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub(crate) fn new(src: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(src.match_indices('\n').map(|(i, _)| i + 1));
        Self { starts }
    }

    /// 1-based line and column (in bytes from the line start, plus one).
    pub(crate) fn locate(&self, src: &str, offset: usize) -> (usize, usize) {
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts[line - 1];
        let end = offset.min(src.len());
        let column = src
            .get(start..end)
            .map_or(end.saturating_sub(start), |s| s.chars().count())
            + 1;
        (line, column)
    }
}
