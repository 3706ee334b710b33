//! Is a rise in a failure rate real, or noise? A one-sided Fisher exact
//! test on two counts: exact for the small counts of short runs (2 of 38
//! against 1 of 38), and still right for a million requests.

/// `ln(n!)`: summed exactly below 256, Stirling's series above (accurate
/// to about 1e-13 there).
fn ln_factorial(n: u64) -> f64 {
    if n < 256 {
        return (2..=n).map(|k| (k as f64).ln()).sum();
    }
    let n = n as f64;
    n * n.ln() - n + 0.5 * (2.0 * std::f64::consts::PI * n).ln() + 1.0 / (12.0 * n)
        - 1.0 / (360.0 * n.powi(3))
        + 1.0 / (1260.0 * n.powi(5))
}

fn ln_choose(n: u64, k: u64) -> f64 {
    ln_factorial(n) - ln_factorial(k) - ln_factorial(n - k)
}

/// The p-value of "`bad_now` of `n_now` is a higher rate than `bad_before`
/// of `n_before`": the chance, if both came from one rate, of a split at
/// least this lopsided (the hypergeometric upper tail). 1 when either
/// total is zero.
pub fn fisher_greater(bad_now: u64, n_now: u64, bad_before: u64, n_before: u64) -> f64 {
    let bad_now = bad_now.min(n_now);
    let bad_before = bad_before.min(n_before);
    if n_now == 0 || n_before == 0 {
        return 1.0;
    }
    let total = n_now + n_before;
    let bad = bad_now + bad_before;
    let denominator = ln_choose(total, n_now);
    let high = bad.min(n_now);
    let tail: f64 = (bad_now..=high)
        .filter(|&k| bad - k <= total - n_now)
        .map(|k| (ln_choose(bad, k) + ln_choose(total - bad, n_now - k) - denominator).exp())
        .sum();
    tail.clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_scipy_on_small_and_large_counts() {
        // The hypergeometric tails, as
        // scipy.stats.fisher_exact([[2, 36], [1, 37]], alternative="greater"): 0.5
        assert!((fisher_greater(2, 38, 1, 38) - 0.5).abs() < 1e-9);
        // [[9, 29], [1, 37]]: 0.0069848
        assert!((fisher_greater(9, 38, 1, 38) - 0.006_984_8).abs() < 1e-6);
        // [[60, 940], [30, 970]]: 0.00081031
        let p = fisher_greater(60, 1000, 30, 1000);
        assert!((p - 0.000_810_31).abs() < 1e-7, "{p}");
        // Fewer failures than before is never significant.
        assert!(fisher_greater(1, 38, 9, 38) > 0.99);
        assert_eq!(fisher_greater(0, 0, 3, 10), 1.0);
    }

    #[test]
    fn the_factorial_series_joins_the_exact_sum() {
        let exact: f64 = (2..=300u64).map(|k| (k as f64).ln()).sum();
        assert!((ln_factorial(300) - exact).abs() < 1e-9);
    }
}
