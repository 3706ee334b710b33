//! When a stack has recovered from a fault, by DESIGN.md's definition: the
//! first moment after which the requests sent during `hold` meet
//! `recovered_when` (success rate, and TTFT p99 against the baseline).

use super::Sample;
use super::stats::percentile;

/// The recovery rule, resolved against the baseline.
#[derive(Debug, Clone, Copy)]
pub struct RecoveryRule {
    pub success_rate: f64,
    pub hold_s: f64,
    /// TTFT p99 a window may have at most (ratio × baseline p99), if any.
    pub max_ttft_p99_ms: Option<f64>,
}

/// Searches `samples` (sorted by send time) from `from_s` for the first
/// window `[t, t + hold]` that meets the rule, with `t` the send time of a
/// request; the window must end by `until_s` (the end of the load).
/// Returns the recovery moment, `from_s` itself when the first window
/// already meets the rule, or `None` when the stack never recovered.
pub fn recovered_at(
    samples: &[Sample],
    from_s: f64,
    until_s: f64,
    rule: &RecoveryRule,
) -> Option<f64> {
    let first = samples.partition_point(|s| s.at_s < from_s);
    let mut end = first;
    let mut ok_in_window = 0usize;
    let mut scratch = Vec::new();
    for start in first..samples.len() {
        let t = samples[start].at_s;
        if t + rule.hold_s > until_s {
            return None;
        }
        if start > first && samples[start - 1].ok() {
            ok_in_window -= 1;
        }
        end = end.max(start);
        while end < samples.len() && samples[end].at_s <= t + rule.hold_s {
            if samples[end].ok() {
                ok_in_window += 1;
            }
            end += 1;
        }
        let total = end - start;
        if total == 0 || (ok_in_window as f64) < rule.success_rate * total as f64 - 1e-9 {
            continue;
        }
        if let Some(max_p99) = rule.max_ttft_p99_ms {
            scratch.clear();
            scratch.extend(
                samples[start..end]
                    .iter()
                    .filter_map(|s| s.ok().then_some(s.ttft_ms)),
            );
            match percentile(&mut scratch, 99.0) {
                Some(p99) if p99 <= max_p99 => {}
                _ => continue,
            }
        }
        return Some(if start == first { from_s } else { t });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Outcome;

    fn samples(spec: &[(f64, bool)]) -> Vec<Sample> {
        spec.iter()
            .map(|&(at, ok)| Sample {
                at_s: at,
                done_s: at + 0.1,
                outcome: if ok { Outcome::Ok } else { Outcome::Connect },
                ttft_ms: 10.0,
                latency_ms: 20.0,
                tpot_ms: f64::NAN,
                output_tokens: 4,
                itl_sum_ms: 0.0,
                itl_count: 0,
                lag_ms: 0.1,
                gap_max_ms: 10.0,
                itl_gaps: 0,
            })
            .collect()
    }

    fn rule() -> RecoveryRule {
        RecoveryRule {
            success_rate: 1.0,
            hold_s: 2.0,
            max_ttft_p99_ms: None,
        }
    }

    #[test]
    fn recovery_is_the_first_request_after_the_outage_that_holds() {
        // Failing from 10 s to 12.5 s, fine from 13 s.
        let spec: Vec<(f64, bool)> = (0..40)
            .map(|i| {
                let t = 8.0 + i as f64 * 0.5;
                (t, !(10.0..13.0).contains(&t))
            })
            .collect();
        assert_eq!(
            recovered_at(&samples(&spec), 10.0, 28.0, &rule()),
            Some(13.0)
        );
    }

    #[test]
    fn no_impact_means_recovered_at_injection() {
        let spec: Vec<(f64, bool)> = (0..20).map(|i| (i as f64, true)).collect();
        assert_eq!(recovered_at(&samples(&spec), 5.5, 20.0, &rule()), Some(5.5));
    }

    #[test]
    fn an_outage_to_the_end_is_unrecovered() {
        let spec: Vec<(f64, bool)> = (0..20).map(|i| (i as f64, i < 10)).collect();
        assert_eq!(recovered_at(&samples(&spec), 10.0, 20.0, &rule()), None);
    }

    #[test]
    fn slow_first_tokens_delay_recovery() {
        let mut s = samples(&(0..20).map(|i| (i as f64, true)).collect::<Vec<_>>());
        for sample in s.iter_mut().take(8) {
            sample.ttft_ms = 500.0;
        }
        let rule = RecoveryRule {
            max_ttft_p99_ms: Some(20.0),
            ..rule()
        };
        assert_eq!(recovered_at(&s, 0.0, 20.0, &rule), Some(8.0));
    }
}
