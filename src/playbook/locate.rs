//! Finds the line of a field in a playbook's text, for errors found after
//! parsing (a fault outside the run, an unknown role).
//!
//! serde_yaml keeps no spans, but it marks any error raised while a node is
//! being read with that node's position. So we walk the document to the
//! path and fail on purpose there; the mark of that error is the answer.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

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

/// 1-based line and column of the node at `path`, or of its nearest
/// ancestor that exists (a missing field is reported where it belongs).
pub fn locate(text: &str, path: &FieldPath) -> Option<(usize, usize)> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    match (Seek { path: &path.0 }).deserialize(deserializer) {
        Ok(()) => None,
        Err(err) => err.location().map(|l| (l.line(), l.column())),
    }
}

struct Seek<'p> {
    path: &'p [Step],
}

const HERE: &str = "shakedown: located";

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seek<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some(Step::Key(wanted)) = self.path.first() else {
            return Err(de::Error::custom(HERE));
        };
        while let Some(key) = map.next_key::<serde_yaml::Value>()? {
            if key.as_str() == Some(wanted.as_str()) {
                return map.next_value_seed(Seek {
                    path: &self.path[1..],
                });
            }
            map.next_value::<IgnoredAny>()?;
        }
        // The field is absent: point at the mapping that should hold it.
        Err(de::Error::custom(HERE))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some(Step::Index(wanted)) = self.path.first() else {
            return Err(de::Error::custom(HERE));
        };
        for _ in 0..*wanted {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(de::Error::custom(HERE));
            }
        }
        match seq.next_element_seed(Seek {
            path: &self.path[1..],
        })? {
            Some(()) => Ok(()),
            None => Err(de::Error::custom(HERE)),
        }
    }

    // A scalar: either the target itself or a dead end; both are the answer.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(HERE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str =
        "name: x\nfaults:\n  - { name: a, at: 5s }\n  - name: b\n    at: 90s\nload:\n  rate: 3\n";

    #[test]
    fn finds_block_and_flow_fields() {
        let at1 = FieldPath::default().key("faults").index(1).key("at");
        assert_eq!(locate(DOC, &at1).map(|l| l.0), Some(5));
        let at0 = FieldPath::default().key("faults").index(0).key("at");
        assert_eq!(locate(DOC, &at0).map(|l| l.0), Some(3));
        let rate = FieldPath::default().key("load").key("rate");
        assert_eq!(locate(DOC, &rate).map(|l| l.0), Some(7));
    }

    #[test]
    fn a_missing_field_points_at_its_parent() {
        let missing = FieldPath::default().key("load").key("request");
        assert_eq!(locate(DOC, &missing).map(|l| l.0), Some(7));
    }

    #[test]
    fn paths_print_as_users_write_them() {
        let p = FieldPath::default().key("faults").index(2).key("at");
        assert_eq!(p.to_string(), "faults[2].at");
    }
}
