//! When requests are sent: seeded open-loop arrival processes.
//!
//! Gaps are drawn as `vllm bench serve` draws them: constant `1/rate`;
//! Poisson, exponential gaps of mean `1/rate`; gamma with shape
//! `burstiness` and scale `1/(rate·burstiness)`, so the mean rate stays the
//! same and burstiness below 1 bunches requests together. A ramp changes
//! the rate linearly over the run; gaps are drawn at unit rate and divided
//! by the rate in force when the gap starts.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Exp1, Gamma};

use crate::playbook::Arrival;

pub struct Arrivals {
    unit: Gap,
    rate: f64,
    /// (starting rate, over how many seconds it reaches `rate`)
    ramp: Option<(f64, f64)>,
    rng: StdRng,
}

/// A gap at one request per second.
enum Gap {
    Constant,
    Exponential,
    Gamma(Gamma<f64>),
}

impl Arrivals {
    /// `rate` is in requests per second and must be above zero (the playbook
    /// checks it); `burstiness` only shapes gamma arrivals.
    pub fn new(
        kind: Arrival,
        rate: f64,
        burstiness: Option<f64>,
        seed: u64,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "the request rate must be above zero, not {rate}"
        );
        let unit = match kind {
            Arrival::Constant => Gap::Constant,
            Arrival::Poisson => Gap::Exponential,
            Arrival::Gamma => {
                let shape = burstiness.unwrap_or(1.0);
                Gap::Gamma(Gamma::new(shape, 1.0 / shape)?)
            }
        };
        Ok(Self {
            unit,
            rate,
            ramp: None,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// Starts at `from` requests per second and reaches the rate after `over` seconds.
    pub fn ramp(mut self, from: f64, over: f64) -> anyhow::Result<Self> {
        anyhow::ensure!(
            from.is_finite() && from > 0.0,
            "a ramp starts above zero, not at {from}"
        );
        self.ramp = Some((from, over.max(1e-9)));
        Ok(self)
    }

    /// The rate in force `at` seconds into the load.
    pub fn rate_at(&self, at: f64) -> f64 {
        match self.ramp {
            None => self.rate,
            Some((from, over)) => from + (self.rate - from) * (at / over).clamp(0.0, 1.0),
        }
    }

    /// Seconds from `at` until the next request.
    pub fn next_gap(&mut self, at: f64) -> f64 {
        let unit = match &self.unit {
            Gap::Constant => 1.0,
            Gap::Exponential => Exp1.sample(&mut self.rng),
            Gap::Gamma(gamma) => gamma.sample(&mut self.rng),
        };
        unit / self.rate_at(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(kind: Arrival, burstiness: Option<f64>) -> (f64, f64) {
        let mut a = Arrivals::new(kind, 50.0, burstiness, 42).unwrap();
        let gaps: Vec<f64> = (0..100_000).map(|_| a.next_gap(0.0)).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        (mean, var)
    }

    #[test]
    fn constant_gaps_are_exact() {
        let (mean, var) = sample(Arrival::Constant, None);
        assert!((mean - 0.02).abs() < 1e-12 && var < 1e-18);
    }

    #[test]
    fn poisson_gaps_have_the_exponential_mean_and_variance() {
        let (mean, var) = sample(Arrival::Poisson, None);
        assert!((mean - 0.02).abs() / 0.02 < 0.02, "mean {mean}");
        assert!((var - 0.0004).abs() / 0.0004 < 0.05, "variance {var}");
    }

    #[test]
    fn gamma_keeps_the_rate_and_spreads_with_burstiness() {
        // Gamma(k, θ): mean kθ = 1/rate, variance kθ² = 1/(rate²·k).
        let (mean, var) = sample(Arrival::Gamma, Some(0.25));
        assert!((mean - 0.02).abs() / 0.02 < 0.03, "mean {mean}");
        let expected = 1.0 / (50.0f64.powi(2) * 0.25);
        assert!(
            (var - expected).abs() / expected < 0.1,
            "variance {var} vs {expected}"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_arrivals() {
        let mut a = Arrivals::new(Arrival::Poisson, 5.0, None, 7).unwrap();
        let mut b = Arrivals::new(Arrival::Poisson, 5.0, None, 7).unwrap();
        for _ in 0..100 {
            assert_eq!(a.next_gap(0.0), b.next_gap(0.0));
        }
    }

    #[test]
    fn a_linear_ramp_sends_the_area_under_the_rate() {
        // 2 → 20 req/s over 100 s: 1,100 requests, a tenth of them in the first 30 s-ish.
        let mut a = Arrivals::new(Arrival::Constant, 20.0, None, 1)
            .unwrap()
            .ramp(2.0, 100.0)
            .unwrap();
        let (mut t, mut sent, mut first_half) = (0.0, 0u32, 0u32);
        loop {
            t += a.next_gap(t);
            if t >= 100.0 {
                break;
            }
            sent += 1;
            if t < 50.0 {
                first_half += 1;
            }
        }
        assert!((i64::from(sent) - 1100).abs() <= 12, "{sent}");
        // ∫0..50 (2 + 0.18 t) dt = 100 + 225 = 325
        assert!((i64::from(first_half) - 325).abs() <= 10, "{first_half}");
        assert_eq!(a.rate_at(200.0), 20.0);
    }
}
