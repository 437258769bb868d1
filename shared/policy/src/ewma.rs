//! Exponentially weighted moving average with explicit timestamps (time as a value, in µs).

/// An EWMA whose weight decays with elapsed time, not with sample count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ewma {
    value: Option<f64>,
    last_us: u64,
    /// Time for an old value's weight to fall to 1/e, µs.
    decay_us: f64,
}

impl Ewma {
    /// An empty average with the given decay time (µs).
    pub fn new(decay_us: u64) -> Self {
        Ewma {
            value: None,
            last_us: 0,
            decay_us: decay_us.max(1) as f64,
        }
    }

    /// Add a sample observed at `now_us`.
    pub fn observe(&mut self, now_us: u64, sample: f64) {
        if !sample.is_finite() {
            return;
        }
        self.value = Some(match self.value {
            None => sample,
            Some(v) => {
                let dt = now_us.saturating_sub(self.last_us) as f64;
                let w = (-dt / self.decay_us).exp();
                v * w + sample * (1.0 - w)
            }
        });
        self.last_us = self.last_us.max(now_us);
    }

    /// Current value, if any sample was seen.
    pub fn get(&self) -> Option<f64> {
        self.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sample_is_the_value_and_old_samples_fade() {
        let mut e = Ewma::new(1_000);
        assert_eq!(e.get(), None);
        e.observe(0, 100.0);
        assert_eq!(e.get(), Some(100.0));
        e.observe(10, 200.0); // little time passed: still close to 100
        assert!(e.get().unwrap() < 110.0);
        e.observe(100_000, 200.0); // long after: the new sample dominates
        assert!((e.get().unwrap() - 200.0).abs() < 1e-6);
        e.observe(100_001, f64::NAN);
        assert!(e.get().unwrap().is_finite());
    }
}
