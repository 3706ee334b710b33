//! Prompt and output lengths: a fixed count, or a distribution sampled
//! per request (seeded), as benchmark workloads spread them.
//!
//! In a playbook: `prompt_tokens: 512`, or
//! `prompt_tokens: { dist: uniform, min: 128, max: 1024 }`,
//! `{ dist: normal, mean: 512, stddev: 128 }`,
//! `{ dist: lognormal, mean: 512, stddev: 256 }` (mean and stddev of the
//! lengths themselves), each optionally bounded by `min` and `max`.

use std::fmt;

use rand::Rng;
use rand_distr::{Distribution, LogNormal, Normal};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// The longest prompt or output shakedown will ask for.
pub const MAX_TOKENS: u32 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum TokenCount {
    Fixed(u32),
    Spread(Spread),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DistKind {
    Uniform,
    Normal,
    Lognormal,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Spread {
    pub dist: DistKind,
    #[serde(default)]
    pub min: Option<u32>,
    #[serde(default)]
    pub max: Option<u32>,
    #[serde(default)]
    pub mean: Option<f64>,
    #[serde(default)]
    pub stddev: Option<f64>,
}

impl TokenCount {
    /// One length, at least 1 and within the bounds given.
    pub fn sample(&self, rng: &mut impl Rng) -> u32 {
        let Self::Spread(spread) = self else {
            let Self::Fixed(n) = self else { unreachable!() };
            return (*n).clamp(1, MAX_TOKENS);
        };
        let low = spread.min.unwrap_or(1).max(1);
        let high = spread.max.unwrap_or(MAX_TOKENS).min(MAX_TOKENS).max(low);
        let value = match spread.dist {
            DistKind::Uniform => return rng.random_range(low..=high),
            DistKind::Normal => {
                let (mean, stddev) = (
                    spread.mean.unwrap_or(f64::from(low)),
                    spread.stddev.unwrap_or(0.0),
                );
                Normal::new(mean, stddev.max(0.0)).map_or(mean, |d| d.sample(rng))
            }
            DistKind::Lognormal => {
                // From the mean and spread of the lengths to those of their log.
                let (mean, stddev) = (
                    spread.mean.unwrap_or(f64::from(low)).max(1e-9),
                    spread.stddev.unwrap_or(0.0).max(0.0),
                );
                let sigma2 = (1.0 + (stddev / mean).powi(2)).ln();
                LogNormal::new(mean.ln() - sigma2 / 2.0, sigma2.sqrt())
                    .map_or(mean, |d| d.sample(rng))
            }
        };
        (value.round().clamp(f64::from(low), f64::from(high))) as u32
    }

    /// What is wrong with it, if anything, in a user's words.
    pub fn problem(&self) -> Option<String> {
        match self {
            Self::Fixed(n) if !(1..=MAX_TOKENS).contains(n) => {
                Some(format!("{n} tokens: give 1 to {MAX_TOKENS}"))
            }
            Self::Fixed(_) => None,
            Self::Spread(s) => {
                if let (Some(min), Some(max)) = (s.min, s.max)
                    && min > max
                {
                    return Some(format!("min {min} is above max {max}"));
                }
                if s.max.is_some_and(|m| m == 0 || m > MAX_TOKENS)
                    || s.min.is_some_and(|m| m > MAX_TOKENS)
                {
                    return Some(format!("bounds are from 1 to {MAX_TOKENS} tokens"));
                }
                match s.dist {
                    DistKind::Uniform if s.min.is_none() || s.max.is_none() => Some("a uniform spread needs `min` and `max`".into()),
                    DistKind::Uniform if s.mean.is_some() || s.stddev.is_some() => Some("a uniform spread takes `min` and `max`, not `mean` or `stddev`".into()),
                    DistKind::Normal | DistKind::Lognormal => match (s.mean, s.stddev) {
                        (Some(mean), Some(stddev)) if mean.is_finite() && mean >= 1.0 && stddev.is_finite() && stddev >= 0.0 => None,
                        _ => Some("a normal or lognormal spread needs `mean` (at least 1) and `stddev` (0 or more)".into()),
                    },
                    DistKind::Uniform => None,
                }
            }
        }
    }
}

impl fmt::Display for TokenCount {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Fixed(n) => write!(f, "{n}"),
            Self::Spread(s) => {
                let kind = match s.dist {
                    DistKind::Uniform => "uniform",
                    DistKind::Normal => "normal",
                    DistKind::Lognormal => "lognormal",
                };
                write!(f, "{kind}")?;
                if let (Some(mean), Some(sd)) = (s.mean, s.stddev) {
                    write!(f, " {mean}±{sd}")?;
                }
                match (s.min, s.max) {
                    (Some(lo), Some(hi)) => write!(f, " {lo}–{hi}"),
                    (Some(lo), None) => write!(f, " ≥{lo}"),
                    (None, Some(hi)) => write!(f, " ≤{hi}"),
                    (None, None) => Ok(()),
                }
            }
        }
    }
}

impl<'de> Deserialize<'de> for TokenCount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CountOrSpread;
        impl<'de> Visitor<'de> for CountOrSpread {
            type Value = TokenCount;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a token count such as `512`, or a spread such as `{ dist: uniform, min: 128, max: 1024 }`")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<TokenCount, E> {
                u32::try_from(v)
                    .map(TokenCount::Fixed)
                    .map_err(|_| E::custom(format!("{v} tokens is more than anyone serves")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<TokenCount, E> {
                Err(E::custom(format!("{v} tokens: a count is 1 or more")))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<TokenCount, A::Error> {
                // Deserialised through the map itself, so an error inside keeps its line.
                Spread::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(TokenCount::Spread)
            }
        }
        deserializer.deserialize_any(CountOrSpread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn stats(count: TokenCount) -> (f64, f64, u32, u32) {
        let mut rng = StdRng::seed_from_u64(3);
        let values: Vec<u32> = (0..50_000).map(|_| count.sample(&mut rng)).collect();
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len() as f64;
        let var = values
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / values.len() as f64;
        (
            mean,
            var.sqrt(),
            *values.iter().min().unwrap(),
            *values.iter().max().unwrap(),
        )
    }

    fn spread(
        dist: DistKind,
        min: Option<u32>,
        max: Option<u32>,
        mean: Option<f64>,
        stddev: Option<f64>,
    ) -> TokenCount {
        TokenCount::Spread(Spread {
            dist,
            min,
            max,
            mean,
            stddev,
        })
    }

    #[test]
    fn spreads_have_their_moments_and_bounds() {
        let (mean, _, lo, hi) = stats(spread(DistKind::Uniform, Some(100), Some(300), None, None));
        assert!(
            (mean - 200.0).abs() < 2.0 && lo == 100 && hi == 300,
            "{mean} {lo} {hi}"
        );
        let (mean, sd, _, _) = stats(spread(
            DistKind::Normal,
            None,
            None,
            Some(512.0),
            Some(64.0),
        ));
        assert!(
            (mean - 512.0).abs() < 2.0 && (sd - 64.0).abs() < 2.0,
            "{mean} {sd}"
        );
        let (mean, sd, _, _) = stats(spread(
            DistKind::Lognormal,
            None,
            None,
            Some(400.0),
            Some(200.0),
        ));
        assert!(
            (mean - 400.0).abs() < 6.0 && (sd - 200.0).abs() < 10.0,
            "{mean} {sd}"
        );
        let (_, _, lo, hi) = stats(spread(
            DistKind::Normal,
            Some(450),
            Some(550),
            Some(512.0),
            Some(200.0),
        ));
        assert!(lo == 450 && hi == 550);
        assert_eq!(stats(TokenCount::Fixed(7)), (7.0, 0.0, 7, 7));
    }

    #[test]
    fn reads_a_count_or_a_spread_and_names_what_is_missing() {
        let fixed: TokenCount = crate::playbook::yaml::from_str("64").unwrap();
        assert_eq!(fixed, TokenCount::Fixed(64));
        let uniform: TokenCount =
            crate::playbook::yaml::from_str("{ dist: uniform, min: 1, max: 9 }").unwrap();
        assert!(uniform.problem().is_none());
        let missing: TokenCount =
            crate::playbook::yaml::from_str("{ dist: normal, mean: 5 }").unwrap();
        assert!(missing.problem().unwrap().contains("stddev"));
        let typo =
            crate::playbook::yaml::from_str::<TokenCount>("{ dist: normal, mean: 5, sd: 1 }")
                .unwrap_err();
        assert!(typo.to_string().contains("unknown field `sd`"), "{typo}");
    }
}
