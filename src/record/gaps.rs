//! Inter-token gaps kept as a log-bucketed histogram per request, so that
//! ITL percentiles over every gap of a phase (as `vllm bench serve`
//! computes them) come from records of bounded size: a stream of any
//! length keeps at most a few hundred buckets, a steady one a handful.
//!
//! Bucket `i` holds gaps from `FLOOR_MS × BASE^i` to `FLOOR_MS × BASE^(i+1)`;
//! a gap is read back as its bucket's geometric middle, within 1% of the
//! true value.
//!
//! On disk the buckets are one string ([`encode`]): `"344:5 2 1 0 3"` is
//! 5 gaps in bucket 344, 2 in 345, 1 in 346, none in 347, 3 in 348. A
//! `b:c` token names its bucket; a bare count is the next bucket's. A
//! stream's gaps cluster, so this is a third of the `[[344,5],[345,2],…]`
//! it replaces, which is still read.

/// Each bucket is 2% wider than the one before.
pub const BASE: f64 = 1.02;
/// The lowest gap told apart from zero: 10 µs.
pub const FLOOR_MS: f64 = 0.01;

/// The bucket of a gap.
pub fn bucket(ms: f64) -> u16 {
    // NaN and anything at or below the floor: the first bucket.
    if ms.is_nan() || ms <= FLOOR_MS {
        return 0;
    }
    ((ms / FLOOR_MS).ln() / BASE.ln())
        .floor()
        .min(f64::from(u16::MAX)) as u16
}

/// The value a bucket stands for: its geometric middle.
pub fn value(bucket: u16) -> f64 {
    FLOOR_MS * BASE.powf(f64::from(bucket) + 0.5)
}

/// [`value`] in whole microseconds (at least 1), from a table: summarising
/// a million records reads tens of millions of buckets, and `powf` each
/// time was a tenth of the work.
pub fn micros(bucket: u16) -> u64 {
    static TABLE: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| ((value(b) * 1000.0).round() as u64).max(1))
            .collect()
    });
    table.get(usize::from(bucket)).copied().unwrap_or(1)
}

/// Counts one gap into `buckets` (bucket, count), kept in bucket order.
pub fn add(buckets: &mut Vec<(u16, u32)>, ms: f64) {
    let b = bucket(ms);
    match buckets.binary_search_by_key(&b, |&(i, _)| i) {
        Ok(at) => buckets[at].1 += 1,
        Err(at) => buckets.insert(at, (b, 1)),
    }
}

/// The buckets as their on-disk string (see the module's header).
pub fn encode(buckets: &[(u16, u32)]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(buckets.len() * 3 + 4);
    let mut next: Option<u16> = None;
    for &(bucket, count) in buckets {
        let sep = if out.is_empty() { "" } else { " " };
        match next {
            // Up to two empty buckets cost less as zeros than as a name.
            Some(n) if bucket >= n && bucket - n <= 2 => {
                for _ in n..bucket {
                    out.push_str(sep);
                    out.push('0');
                }
                let _ = write!(out, " {count}");
            }
            _ => {
                let _ = write!(out, "{sep}{bucket}:{count}");
            }
        }
        next = bucket.checked_add(1);
    }
    out
}

/// Reads the on-disk string back, calling `each` with every (bucket,
/// count) of a count above zero; `None` on a malformed string.
pub fn decode(text: &str, mut each: impl FnMut(u16, u32)) -> Option<()> {
    let mut next: u32 = 0;
    for token in text.split_ascii_whitespace() {
        let (bucket, count): (u16, u32) = match token.split_once(':') {
            Some((bucket, count)) => (bucket.parse().ok()?, count.parse().ok()?),
            None => (u16::try_from(next).ok()?, token.parse().ok()?),
        };
        if count > 0 {
            each(bucket, count);
        }
        next = u32::from(bucket) + 1;
    }
    Some(())
}

/// The buckets as a record writes them: one string.
pub fn serialize<S: serde::Serializer>(buckets: &[(u16, u32)], out: S) -> Result<S::Ok, S::Error> {
    out.serialize_str(&encode(buckets))
}

/// The buckets as a record has them: the string, or the pairs older runs wrote.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum OnDisk<'a> {
    #[serde(borrow)]
    Text(std::borrow::Cow<'a, str>),
    Pairs(Vec<(u16, u32)>),
}

impl OnDisk<'_> {
    /// Every (bucket, count); `None` on a malformed string.
    pub fn each(&self, mut each: impl FnMut(u16, u32)) -> Option<()> {
        match self {
            OnDisk::Text(text) => decode(text, each),
            OnDisk::Pairs(pairs) => {
                pairs.iter().for_each(|&(b, c)| each(b, c));
                Some(())
            }
        }
    }
}

pub fn deserialize<'de, D: serde::Deserializer<'de>>(
    input: D,
) -> Result<Vec<(u16, u32)>, D::Error> {
    use serde::Deserialize;
    let on_disk = OnDisk::deserialize(input)?;
    let mut buckets = Vec::new();
    on_disk
        .each(|b, c| buckets.push((b, c)))
        .ok_or_else(|| serde::de::Error::custom("malformed ITL buckets"))?;
    Ok(buckets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_go_to_disk_as_a_short_string_and_come_back() {
        let buckets = vec![(344, 5), (345, 2), (346, 1), (348, 3), (400, 1), (401, 7)];
        let text = encode(&buckets);
        assert_eq!(text, "344:5 2 1 0 3 400:1 7");
        let mut back = Vec::new();
        decode(&text, |b, c| back.push((b, c))).unwrap();
        assert_eq!(back, buckets);
        assert_eq!(encode(&[]), "");
        assert!(decode("344:x", |_, _| {}).is_none());
        assert!(
            decode("7", |_, _| {}).is_some(),
            "a bare count starts at bucket 0"
        );
        assert_eq!(encode(&[(u16::MAX, 1)]), "65535:1");
    }

    #[test]
    fn a_gap_reads_back_within_one_percent() {
        for ms in [0.05, 1.0, 9.7, 10.0, 33.3, 250.0, 12_345.0] {
            let back = value(bucket(ms));
            assert!((back - ms).abs() / ms < 0.01, "{ms} read back as {back}");
        }
        assert_eq!(bucket(0.0), 0);
        assert_eq!(bucket(f64::NAN), 0);
    }

    #[test]
    fn a_steady_stream_keeps_few_buckets_in_order() {
        let mut buckets = Vec::new();
        for i in 0..1000 {
            add(&mut buckets, 20.0 + f64::from(i % 3) * 0.1);
        }
        add(&mut buckets, 900.0);
        assert!(buckets.len() <= 3, "{buckets:?}");
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u32>(), 1001);
        assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
