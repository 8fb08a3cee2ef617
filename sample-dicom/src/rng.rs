//! A tiny seeded PRNG (SplitMix64) so output depends only on the seed.
//!
//! Not cryptographic; used for invented names, dates, noise and UIDs.

/// SplitMix64 (Steele, Lea, Flood 2014): one 64-bit state, full period.
#[derive(Clone, Debug)]
pub(crate) struct Rng {
    state: u64,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// An independent stream for a named purpose, so adding draws in one
    /// place does not shift every later value.
    pub(crate) fn fork(&self, label: &str) -> Rng {
        let mut h = self.state ^ 0xA076_1D64_78BD_642F;
        for b in label.bytes() {
            h = mix(h ^ u64::from(b));
        }
        Rng::new(mix(h))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// Uniform in `0..n` (n > 0); the tiny modulo bias is irrelevant here.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: i64, hi: i64) -> i64 {
        debug_assert!(lo <= hi);
        lo + self.below((hi - lo + 1) as u64) as i64
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// Approximately normal (sum of four uniforms), mean 0, sd 1: cheap and
    /// good enough for image noise.
    pub(crate) fn gauss(&mut self) -> f64 {
        let s = self.unit() + self.unit() + self.unit() + self.unit();
        (s - 2.0) * 1.732_050_8
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A UID under the `2.25` root (PS3.5 B.2): the decimal form of a
/// version-4-shaped UUID drawn from the seeded stream.
pub(crate) fn uid(rng: &mut Rng) -> String {
    let hi = rng.next_u64();
    let lo = rng.next_u64();
    let mut v = (u128::from(hi) << 64) | u128::from(lo);
    // version 4 and RFC 4122 variant bits, so the number is a well-formed UUID
    v &= !(0xF_u128 << 76);
    v |= 0x4_u128 << 76;
    v &= !(0x3_u128 << 62);
    v |= 0x2_u128 << 62;
    format!("2.25.{v}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..10 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert_ne!(Rng::new(7).next_u64(), Rng::new(8).next_u64());
    }

    #[test]
    fn uids_are_valid() {
        let mut r = Rng::new(1);
        for _ in 0..100 {
            let u = uid(&mut r);
            assert!(u.len() <= 64);
            assert!(u.starts_with("2.25."));
            let tail = &u[5..];
            assert!(tail.bytes().all(|b| b.is_ascii_digit()));
            assert!(!tail.starts_with('0'));
        }
    }
}
