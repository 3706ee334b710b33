//! When requests are sent: seeded open-loop arrival processes.
//!
//! Gaps are drawn as `vllm bench serve` draws them: constant `1/rate`;
//! Poisson, exponential gaps of mean `1/rate`; gamma with shape
//! `burstiness` and scale `1/(rate·burstiness)`, so the mean rate stays the
//! same and burstiness below 1 bunches requests together.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Exp, Gamma};

use crate::playbook::Arrival;

pub struct Arrivals {
    kind: Gap,
    rng: StdRng,
}

enum Gap {
    Constant(f64),
    Exponential(Exp<f64>),
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
        let kind = match kind {
            Arrival::Constant => Gap::Constant(1.0 / rate),
            Arrival::Poisson => Gap::Exponential(Exp::new(rate)?),
            Arrival::Gamma => {
                let shape = burstiness.unwrap_or(1.0);
                Gap::Gamma(Gamma::new(shape, 1.0 / (rate * shape))?)
            }
        };
        Ok(Self {
            kind,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// Seconds until the next request.
    pub fn next_gap(&mut self) -> f64 {
        match &self.kind {
            Gap::Constant(gap) => *gap,
            Gap::Exponential(exp) => exp.sample(&mut self.rng),
            Gap::Gamma(gamma) => gamma.sample(&mut self.rng),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(kind: Arrival, burstiness: Option<f64>) -> (f64, f64) {
        let mut a = Arrivals::new(kind, 50.0, burstiness, 42).unwrap();
        let gaps: Vec<f64> = (0..100_000).map(|_| a.next_gap()).collect();
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
            assert_eq!(a.next_gap(), b.next_gap());
        }
    }
}
