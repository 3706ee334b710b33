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
/// count) of a count above zero; `None` on a malformed string. Byte by
/// byte: a million records are tens of millions of tokens.
pub fn decode(text: &str, mut each: impl FnMut(u16, u32)) -> Option<()> {
    let bytes = text.as_bytes();
    let mut at = 0;
    let number = |at: &mut usize| -> Option<u32> {
        let start = *at;
        let mut value: u32 = 0;
        while let Some(digit) = bytes.get(*at).filter(|b| b.is_ascii_digit()) {
            value = value
                .checked_mul(10)?
                .checked_add(u32::from(digit - b'0'))?;
            *at += 1;
        }
        (*at > start).then_some(value)
    };
    let mut next: u32 = 0;
    loop {
        while bytes.get(at).is_some_and(u8::is_ascii_whitespace) {
            at += 1;
        }
        if at == bytes.len() {
            return Some(());
        }
        let first = number(&mut at)?;
        let (bucket, count) = if bytes.get(at) == Some(&b':') {
            at += 1;
            (u16::try_from(first).ok()?, number(&mut at)?)
        } else {
            (u16::try_from(next).ok()?, first)
        };
        // A token ends at a space or at the end.
        if bytes.get(at).is_some_and(|b| !b.is_ascii_whitespace()) {
            return None;
        }
        if count > 0 {
            each(bucket, count);
        }
        next = u32::from(bucket) + 1;
    }
}

/// The buckets as a record writes them: one string.
pub fn serialize<S: serde::Serializer>(buckets: &[(u16, u32)], out: S) -> Result<S::Ok, S::Error> {
    out.serialize_str(&encode(buckets))
}

/// The buckets as a record has them: the string, or the pairs older runs
/// wrote (or a record in memory holds).
#[derive(Debug)]
pub enum OnDisk<'a> {
    Text(std::borrow::Cow<'a, str>),
    Pairs(std::borrow::Cow<'a, [(u16, u32)]>),
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

// By hand rather than `#[serde(untagged)]`, which buffers every value
// before trying each variant: a tenth of the summary's time.
impl<'de: 'a, 'a> serde::Deserialize<'de> for OnDisk<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(input: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OnDisk<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("ITL buckets: a string such as \"344:5 2 1\", or [[bucket, count], …]")
            }
            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(OnDisk::Text(std::borrow::Cow::Borrowed(text)))
            }
            fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
                Ok(OnDisk::Text(std::borrow::Cow::Owned(text.to_string())))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = seq.next_element::<(u16, u32)>()? {
                    pairs.push(pair);
                }
                Ok(OnDisk::Pairs(std::borrow::Cow::Owned(pairs)))
            }
        }
        input.deserialize_any(Visitor)
    }
}

/// Many requests' buckets in one buffer, a few bytes each (varints:
/// how many pairs, then each pair's bucket step and count), so that the
/// summary reads the records once and still has every gap when the
/// phases are known. A request's buckets are found by the [`PackedId`]
/// [`Packed::push`] gave.
#[derive(Debug, Default, Clone)]
pub struct Packed {
    bytes: Vec<u8>,
}

/// Where a request's buckets start in a [`Packed`], plus one; 0 is none.
pub type PackedId = u32;

impl Packed {
    /// Packs one request's buckets. `Ok(0)` for none, an error for a
    /// malformed string or a buffer past 4 GiB (a quarter of a billion
    /// records: more than a summary holds in memory).
    pub fn push(&mut self, buckets: &OnDisk<'_>) -> Result<PackedId, &'static str> {
        let at = self.bytes.len();
        let mut pairs = 0u32;
        let mut body = Vec::new();
        let mut next = 0u32;
        buckets
            .each(|bucket, count| {
                let bucket = u32::from(bucket);
                // Buckets come in order; one out of order is named in full.
                let step = if bucket >= next {
                    bucket - next
                } else {
                    bucket
                };
                let flag = u32::from(bucket < next);
                varint(&mut body, (step << 1) | flag);
                varint(&mut body, count);
                next = bucket + 1;
                pairs += 1;
            })
            .ok_or("malformed ITL buckets")?;
        if pairs == 0 {
            return Ok(0);
        }
        varint(&mut self.bytes, pairs);
        self.bytes.extend_from_slice(&body);
        PackedId::try_from(at + 1).map_err(|_| "over 4 GiB of ITL buckets to hold")
    }

    /// Calls `each` with every (bucket, count) of the request `id` names.
    pub fn each(&self, id: PackedId, mut each: impl FnMut(u16, u32)) {
        let Some(mut rest) = (id as usize)
            .checked_sub(1)
            .and_then(|at| self.bytes.get(at..))
        else {
            return;
        };
        let pairs = read_varint(&mut rest);
        let mut next = 0u32;
        for _ in 0..pairs {
            let step = read_varint(&mut rest);
            let count = read_varint(&mut rest);
            let bucket = if step & 1 == 1 {
                step >> 1
            } else {
                next + (step >> 1)
            };
            each(u16::try_from(bucket).unwrap_or(u16::MAX), count);
            next = bucket + 1;
        }
    }

    /// Moves `other`'s buckets after this one's, returning what to add to
    /// `other`'s ids.
    pub fn append(&mut self, other: &mut Packed) -> Result<u32, &'static str> {
        let base = u32::try_from(self.bytes.len()).map_err(|_| "over 4 GiB of ITL buckets")?;
        u32::try_from(self.bytes.len() + other.bytes.len())
            .map_err(|_| "over 4 GiB of ITL buckets to hold")?;
        self.bytes.append(&mut other.bytes);
        Ok(base)
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

fn varint(out: &mut Vec<u8>, mut value: u32) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A varint from the front of `bytes`; 0 past the end (only ever
/// reading what [`varint`] wrote).
fn read_varint(bytes: &mut &[u8]) -> u32 {
    let mut value = 0u32;
    for shift in (0..35).step_by(7) {
        let Some((&byte, rest)) = bytes.split_first() else {
            return value;
        };
        *bytes = rest;
        value |= u32::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    value
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
        assert!(decode("344:5x", |_, _| {}).is_none());
        assert!(decode("70000:1", |_, _| {}).is_none());
        assert!(decode("344:", |_, _| {}).is_none());
        let mut spaced = Vec::new();
        decode("  344:5   2 ", |b, c| spaced.push((b, c))).unwrap();
        assert_eq!(spaced, vec![(344, 5), (345, 2)]);
        assert!(
            decode("7", |_, _| {}).is_some(),
            "a bare count starts at bucket 0"
        );
        assert_eq!(encode(&[(u16::MAX, 1)]), "65535:1");
    }

    #[test]
    fn packed_buckets_come_back_as_they_went_in() {
        let mut packed = Packed::default();
        let steady = vec![(344, 5), (345, 2), (348, 300), (60_000, 1)];
        let none = packed.push(&OnDisk::Pairs(Vec::new().into())).unwrap();
        let a = packed.push(&OnDisk::Text(encode(&steady).into())).unwrap();
        // Out of order, as a hand-edited file might have them.
        let jumbled = vec![(9, 1), (3, 2), (u16::MAX, 70_000)];
        let b = packed.push(&OnDisk::Pairs(jumbled.clone().into())).unwrap();
        let mut other = Packed::default();
        let c = other.push(&OnDisk::Pairs(steady.clone().into())).unwrap();
        let base = packed.append(&mut other).unwrap();
        let read = |id| {
            let mut back = Vec::new();
            packed.each(id, |b, c| back.push((b, c)));
            back
        };
        assert_eq!(none, 0);
        assert!(read(none).is_empty());
        assert_eq!(read(a), steady);
        assert_eq!(read(b), jumbled);
        assert_eq!(read(c + base), steady);
        assert!(packed.push(&OnDisk::Text("344:x".into())).is_err());
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
