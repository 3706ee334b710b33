//! How long an emulated GPU takes: the timing model of the emulated engine.
//!
//! Prefill grows with the prompt; each decode step grows with the number of
//! sequences in the running batch, as memory bandwidth is shared. Pure
//! arithmetic, so tests can check it without a server.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimingModel {
    /// Fixed cost of a prefill (scheduling, first kernel launches).
    pub prefill_base: Duration,
    /// Added per prompt token.
    pub prefill_per_token: Duration,
    /// Time per output token with a batch of one.
    pub decode_per_token: Duration,
    /// Fraction added to a decode step for each other running sequence.
    pub batch_slowdown: f64,
}

impl TimingModel {
    pub fn prefill(&self, prompt_tokens: u32) -> Duration {
        self.prefill_base + self.prefill_per_token * prompt_tokens
    }

    /// One decode step when `running` sequences share the batch.
    pub fn decode_step(&self, running: usize) -> Duration {
        let others = running.saturating_sub(1) as f64;
        self.decode_per_token
            .mul_f64(1.0 + self.batch_slowdown.max(0.0) * others)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> TimingModel {
        TimingModel {
            prefill_base: Duration::from_millis(5),
            prefill_per_token: Duration::from_micros(100),
            decode_per_token: Duration::from_millis(10),
            batch_slowdown: 0.5,
        }
    }

    #[test]
    fn prefill_grows_with_the_prompt() {
        assert_eq!(model().prefill(0), Duration::from_millis(5));
        assert_eq!(model().prefill(100), Duration::from_millis(15));
    }

    #[test]
    fn decode_slows_with_the_batch() {
        assert_eq!(model().decode_step(1), Duration::from_millis(10));
        assert_eq!(model().decode_step(3), Duration::from_millis(20));
        assert_eq!(model().decode_step(0), Duration::from_millis(10));
    }
}
