//! `Backoff`: the wait between attempts of every retry loop in Latch (the proxy's SVID renewal
//! and discovery stream, the control plane's own serving certificates and its Kubernetes
//! writers). Capped exponential with jitter: the first wait, doubling per consecutive failure up
//! to the cap, each wait drawn from the upper half below it so retries from many processes do
//! not synchronise.
//!
//! It lives in latch-admin, the crate of what both binaries share to be operable (admin server,
//! logging), because a retry policy is process plumbing like those, and both latch-control and
//! latch-proxy already depend on it. latch-identity, the other crate both depend on, is about
//! who a workload is and has no retry loop of its own.

use std::time::Duration;

/// Capped exponential backoff with jitter. `next_wait` after each failure, `reset` after a
/// success.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    /// The un-jittered wait of the last failure; `None` after a success.
    current: Option<Duration>,
}

impl Backoff {
    /// Waits start at `first` and double up to `cap` (never below `first`).
    pub fn new(first: Duration, cap: Duration) -> Self {
        Self {
            first,
            cap: cap.max(first),
            current: None,
        }
    }

    /// The wait before the next attempt after one more failure: `first`, then twice the last,
    /// at most the cap, times a uniform factor in [0.5, 1).
    pub fn next_wait(&mut self) -> Duration {
        let base = match self.current {
            None => self.first,
            Some(last) => last.saturating_mul(2).min(self.cap),
        };
        self.current = Some(base);
        base.mul_f64(0.5 + 0.5 * random_unit())
    }

    /// After a success: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.current = None;
    }

    /// Whether no failure happened since the last success.
    pub fn is_reset(&self) -> bool {
        self.current.is_none()
    }

    /// Changes the cap (the proxy's SVID renewal caps retries by the SVID's validity, known
    /// only once one is held). Takes effect from the next wait.
    pub fn set_cap(&mut self, cap: Duration) {
        self.cap = cap.max(self.first);
    }
}

/// A uniform random number in [0, 1), for jitter and for spreading renewals.
pub fn random_unit() -> f64 {
    let mut bytes = [0u8; 4];
    // The OS random source failing leaves zeros: the jitter degrades to a fixed factor, the
    // retry still happens.
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    f64::from(u32::from_be_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn waits_double_up_to_the_cap_within_the_upper_half() {
        let mut backoff = Backoff::new(100 * MS, 1000 * MS);
        for base in [100, 200, 400, 800, 1000, 1000] {
            let wait = backoff.next_wait();
            assert!(
                wait >= base * MS / 2 && wait < base * MS,
                "base {base} ms gave {wait:?}"
            );
        }
    }

    #[test]
    fn reset_starts_over_at_the_first_wait() {
        let mut backoff = Backoff::new(100 * MS, 1000 * MS);
        assert!(backoff.is_reset());
        for _ in 0..5 {
            backoff.next_wait();
        }
        assert!(!backoff.is_reset());
        backoff.reset();
        assert!(backoff.is_reset());
        assert!(backoff.next_wait() < 100 * MS);
    }

    #[test]
    fn a_lower_cap_applies_from_the_next_wait_and_never_goes_below_the_first() {
        let mut backoff = Backoff::new(100 * MS, 10_000 * MS);
        for _ in 0..10 {
            backoff.next_wait();
        }
        backoff.set_cap(300 * MS);
        assert!(backoff.next_wait() < 300 * MS);
        backoff.set_cap(MS);
        assert!(backoff.next_wait() >= 50 * MS);
    }

    #[test]
    fn random_unit_stays_in_range() {
        for _ in 0..1000 {
            let x = random_unit();
            assert!((0.0..1.0).contains(&x), "{x}");
        }
    }
}
