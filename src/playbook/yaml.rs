//! The one place shakedown reads YAML: strict deserialisation that says
//! where any error is (line, column, field), and where each field of a
//! document sits, for the problems found after parsing.
//!
//! [serde-saphyr] marks every error with its position and refuses
//! pathological input (nesting, aliases) within budgets, so a bracket bomb
//! is refused at once; [serde_path_to_error] names the field. Once parsing
//! is done no struct knows its line any more, so [`Spans`] reads the text a
//! second time into a tree of nodes with their positions, and [`Spans::find`]
//! walks it to a [`FieldPath`] — only when there is a problem to locate.
//!
//! [serde-saphyr]: https://docs.rs/serde-saphyr
//! [serde_path_to_error]: https://docs.rs/serde_path_to_error

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{MessageFormatter, Spanned};

/// One step of a field path: a mapping key or a sequence index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// A field path such as `faults[1].at`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Step>);

impl FieldPath {
    pub fn key(mut self, key: &str) -> Self {
        self.0.push(Step::Key(key.to_string()));
        self
    }
    pub fn index(mut self, index: usize) -> Self {
        self.0.push(Step::Index(index));
        self
    }
    /// Reads back a path as [`FieldPath`]'s `Display` writes it.
    pub fn parse(text: &str) -> Self {
        let mut path = FieldPath::default();
        for part in text.split('.').filter(|p| !p.is_empty()) {
            let (key, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if !key.is_empty() {
                path.0.push(Step::Key(key.to_string()));
            }
            while let Some(inner) = rest.strip_prefix('[') {
                let Some(end) = inner.find(']') else { break };
                if let Ok(index) = inner[..end].parse() {
                    path.0.push(Step::Index(index));
                }
                rest = &inner[end + 1..];
            }
        }
        path
    }

    /// Appends a path such as serde_path_to_error gives (`a.b[2].c`).
    pub fn join(mut self, rest: &serde_path_to_error::Path) -> Self {
        for segment in rest.iter() {
            match segment {
                serde_path_to_error::Segment::Seq { index } => self.0.push(Step::Index(*index)),
                serde_path_to_error::Segment::Map { key } => self.0.push(Step::Key(key.clone())),
                serde_path_to_error::Segment::Enum { variant } => {
                    self.0.push(Step::Key(variant.clone()))
                }
                serde_path_to_error::Segment::Unknown => {}
            }
        }
        self
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, step) in self.0.iter().enumerate() {
            match step {
                Step::Key(k) if i == 0 => write!(f, "{k}")?,
                Step::Key(k) => write!(f, ".{k}")?,
                Step::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A line and column, both from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: u32,
    pub column: u32,
}

/// What went wrong reading YAML, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    pub position: Option<Position>,
    pub field: FieldPath,
    pub message: String,
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = self.position {
            write!(f, "{}:{}: ", p.line, p.column)?;
        }
        if !self.field.0.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for YamlError {}

/// Nesting deeper than a playbook ever needs (it nests about six deep) is
/// refused before it costs anything.
const MAX_NESTING: usize = 32;

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        with_snippet: false,
        budget: serde_saphyr::budget! {
            flow_nesting_limit: MAX_NESTING,
            max_depth: MAX_NESTING,
        },
    }
}

fn position_of(location: serde_saphyr::Location) -> Option<Position> {
    (location.line() > 0).then(|| Position {
        line: u32::try_from(location.line()).unwrap_or(u32::MAX),
        column: u32::try_from(location.column()).unwrap_or(u32::MAX),
    })
}

/// Strict deserialisation of `text`, with the position and field of any error.
pub fn from_str<T: for<'de> de::Deserialize<'de>>(text: &str) -> Result<T, YamlError> {
    let mut path = None;
    let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        serde_path_to_error::deserialize(de).map_err(|err| {
            path = Some(FieldPath::default().join(err.path()));
            err.into_inner()
        })
    });
    parsed.map_err(|err| YamlError {
        position: err.location().and_then(position_of),
        field: path.unwrap_or_default(),
        message: serde_saphyr::DefaultMessageFormatter
            .format_message(&err)
            .escape_debug()
            .to_string()
            .replace("\\'", "'")
            .replace("\\\"", "\""),
    })
}

/// A document as nodes with their positions: where each field sits.
#[derive(Debug)]
pub struct Spans(Spanned<Node>);

#[derive(Debug)]
enum Node {
    Map(Vec<(String, Spanned<Node>)>),
    Seq(Vec<Spanned<Node>>),
    Scalar,
}

impl Spans {
    /// Reads `text`; the error is a YAML syntax error (or a document past
    /// the reader's budgets), at its own position.
    pub fn read(text: &str) -> Result<Self, YamlError> {
        from_str::<Spanned<Node>>(text).map(Spans)
    }

    /// Where the node at `path` is; for a path that does not exist (a
    /// missing field), where its nearest existing parent is.
    pub fn find(&self, path: &FieldPath) -> Option<Position> {
        let mut node = &self.0;
        for step in &path.0 {
            let child = match (&node.value, step) {
                (Node::Map(entries), Step::Key(key)) => {
                    entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
                }
                (Node::Seq(items), Step::Index(i)) => items.get(*i),
                _ => None,
            };
            match child {
                Some(child) => node = child,
                None => break,
            }
        }
        position_of(node.referenced)
    }
}

impl<'de> de::Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<KeyText>()? {
            entries.push((key.0, map.next_value()?));
        }
        Ok(Node::Map(entries))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_i128<E>(self, _: i128) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_u128<E>(self, _: u128) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_str<E>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
}

/// A mapping key as text, whatever its YAML type (`1: x` keys a `"1"`).
struct KeyText(String);

impl<'de> de::Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_unit<E>(self) -> Result<KeyText, E> {
                Ok(KeyText(String::new()))
            }
        }
        deserializer.deserialize_any(Text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str =
        "name: x\nfaults:\n  - { name: a, at: 5s }\n  - name: b\n    at: 90s\nload:\n  rate: 3\n";

    #[test]
    fn finds_block_and_flow_fields() {
        let spans = Spans::read(DOC).ok().unwrap();
        let at1 = FieldPath::default().key("faults").index(1).key("at");
        assert_eq!(spans.find(&at1).map(|p| p.line), Some(5));
        let at0 = FieldPath::default().key("faults").index(0).key("at");
        assert_eq!(spans.find(&at0).map(|p| p.line), Some(3));
        let rate = FieldPath::default().key("load").key("rate");
        assert_eq!(spans.find(&rate).map(|p| p.line), Some(7));
    }

    #[test]
    fn a_missing_field_points_at_its_parent() {
        let spans = Spans::read(DOC).ok().unwrap();
        let missing = FieldPath::default().key("load").key("request");
        assert_eq!(spans.find(&missing).map(|p| p.line), Some(7));
    }

    #[test]
    fn paths_print_as_users_write_them() {
        let p = FieldPath::default().key("faults").index(2).key("at");
        assert_eq!(p.to_string(), "faults[2].at");
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Probe {
        count: u32,
        inner: Option<Inner>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        rate: f64,
    }

    #[test]
    fn errors_name_their_field_and_line() {
        let err = from_str::<Probe>("count: 3\ninner:\n  rat: 2\n").unwrap_err();
        eprintln!("{err:?}");
        assert_eq!(err.position.map(|p| p.line), Some(3));
        assert_eq!(err.field.to_string(), "inner.rat");
        let err = from_str::<Probe>("count: lots\n").unwrap_err();
        eprintln!("{err:?}");
        assert_eq!(err.field.to_string(), "count");
        let err = from_str::<Probe>("count: 99999999999999\n").unwrap_err();
        eprintln!("{err:?}");
        let err = from_str::<Probe>("count: 1\ninner: [unclosed\n").unwrap_err();
        eprintln!("{err:?}");
        let err = from_str::<Probe>("inner: { rate: 1 }\n").unwrap_err();
        eprintln!("{err:?}");
        let err = from_str::<Probe>("count: 1\ninner:\n\trate: 1\n").unwrap_err();
        eprintln!("{err:?}");
        let deep = format!("count: {}", "[".repeat(100_000));
        let started = std::time::Instant::now();
        let err = from_str::<Probe>(&deep).unwrap_err();
        eprintln!("{err:?} in {:?}", started.elapsed());
    }
}
