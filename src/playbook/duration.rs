//! Human durations as playbooks write them: `200ms`, `8s`, `1.5s`, `5m`, `1h30m`.
//!
//! A bare number is refused on purpose: `60` could be seconds or
//! milliseconds, and a chaos run is the wrong place to guess.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration read from a playbook. Serialises back to the same notation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn from_secs_f64(secs: f64) -> Self {
        Self(Duration::from_secs_f64(secs))
    }
    pub fn as_secs_f64(self) -> f64 {
        self.0.as_secs_f64()
    }
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Self {
        d.0
    }
}

/// Parses `1h30m`, `250ms`, `1.5s`. The error says what would be valid.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let hint = "write a number with a unit, such as `200ms`, `8s`, `1.5s`, `5m` or `1h30m`";
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("empty duration: {hint}"));
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return Err(format!("`{text}` is not a duration: {hint}"));
        }
        let number: f64 = rest[..number_len]
            .parse()
            .map_err(|_| format!("`{text}` is not a duration: {hint}"))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("`{text}` has no unit: {hint}")),
            other => {
                return Err(format!(
                    "`{other}` is not a unit of time in `{text}`: {hint}"
                ));
            }
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    // A week is far beyond any chaos run; it also keeps from_secs_f64 safe.
    if !total.is_finite() || total > 7.0 * 24.0 * 3600.0 {
        return Err(format!("`{text}` is longer than a week"));
    }
    Ok(Duration::from_secs_f64(total))
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            write!(f, "0s")
        } else if ms % 60_000 == 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms % 1000 == 0 && ms > 60_000 {
            // 150s reads better as 2m30s beside whole minutes.
            write!(f, "{}m{}s", ms / 60_000, ms % 60_000 / 1000)
        } else if ms % 1000 == 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration with a unit, such as `200ms`, `8s` or `5m`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                parse_duration(v).map(HumanDuration).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Err(E::custom(format!(
                    "`{v}` has no unit: write `{v}s` or `{v}ms`"
                )))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Err(E::custom(format!(
                    "`{v}` is not a duration: durations are positive, with a unit, such as `{}s`",
                    v.unsigned_abs()
                )))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Err(E::custom(format!("`{v}` has no unit: write `{v}s`")))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// In the playbook's JSON Schema: a string, a number with a unit.
impl schemars::JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^\\s*([0-9]+(\\.[0-9]+)?(ms|s|m|h))+\\s*$",
            "description": "A duration with a unit: `200ms`, `8s`, `1.5s`, `5m`, `1h30m`.",
            "examples": ["500ms", "10s", "5m"]
        })
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_notations_playbooks_use() {
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("8s").unwrap(), Duration::from_secs(8));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn refuses_what_it_cannot_read_and_says_why() {
        assert!(parse_duration("60").unwrap_err().contains("no unit"));
        assert!(parse_duration("3 days").unwrap_err().contains("not a"));
        assert!(
            parse_duration("5d")
                .unwrap_err()
                .contains("`d` is not a unit")
        );
        assert!(parse_duration("").unwrap_err().contains("empty"));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("9999h").unwrap_err().contains("week"));
    }

    #[test]
    fn displays_in_the_same_notation() {
        assert_eq!(
            HumanDuration(Duration::from_millis(200)).to_string(),
            "200ms"
        );
        assert_eq!(HumanDuration(Duration::from_secs(45)).to_string(), "45s");
        assert_eq!(HumanDuration(Duration::from_secs(90)).to_string(), "1m30s");
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(HumanDuration(Duration::from_secs(300)).to_string(), "5m");
    }
}
