//! Inter-token gaps kept as a log-bucketed histogram per request, so that
//! ITL percentiles over every gap of a phase (as `vllm bench serve`
//! computes them) come from records of bounded size: a stream of any
//! length keeps at most a few hundred buckets, a steady one a handful.
//!
//! Bucket `i` holds gaps from `FLOOR_MS × BASE^i` to `FLOOR_MS × BASE^(i+1)`;
//! a gap is read back as its bucket's geometric middle, within 1% of the
//! true value.

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

#[cfg(test)]
mod tests {
    use super::*;

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
