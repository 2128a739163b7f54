//! The seeded generator every part of the project draws from (spec §1.2): the anchors, the
//! data order and augmentation, MixUp and the initial weights.
//!
//! [`SeededRng`] is xoshiro256\*\* (Blackman & Vigna, 2018) whose 256-bit state is filled by four
//! outputs of SplitMix64 started at the seed. Uniforms are `(x >> 11) · 2⁻⁵³ ∈ [0, 1)`; standard
//! normals come from the Box–Muller transform in `f64` with libm's `log`, `sqrt`, `cos`, `sin`:
//! `u1 = 1 − U₁ ∈ (0, 1]`, `u2 = U₂`, `r = √(−2 ln u1)`, giving `r cos 2πu2` then `r sin 2πu2`.
//! Everything is integer or libm arithmetic, so a seed gives the same bits on every platform.

/// The project's seeded, portable pseudo-random generator (see the module docs): the anchors,
/// data order, augmentation and initialisation all draw from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeededRng {
    state: [u64; 4],
    spare_normal: Option<u64>,
}

/// One step of SplitMix64 (Steele, Lea & Flood, 2014): advances `x` and returns the output.
pub fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SeededRng {
    /// Seeds the generator: the state is four successive SplitMix64 outputs from `seed`.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let state = [
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
        ];
        SeededRng {
            state,
            spare_normal: None,
        }
    }

    /// Next 64 random bits (xoshiro256\*\*).
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal by Box–Muller (the second value of each pair is kept for the next call).
    pub fn next_normal(&mut self) -> f64 {
        if let Some(bits) = self.spare_normal.take() {
            return f64::from_bits(bits);
        }
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        let r = libm::sqrt(-2.0 * libm::log(u1));
        let theta = 2.0 * core::f64::consts::PI * u2;
        self.spare_normal = Some((r * libm::sin(theta)).to_bits());
        r * libm::cos(theta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_reference_values() {
        // Reference outputs of SplitMix64 from seed 0 (as published with the algorithm).
        let mut x = 0u64;
        assert_eq!(splitmix64(&mut x), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(&mut x), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(splitmix64(&mut x), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn normals_have_unit_moments() {
        let mut rng = SeededRng::new(42);
        let n = 200_000;
        let (mut s1, mut s2) = (0.0, 0.0);
        for _ in 0..n {
            let z = rng.next_normal();
            s1 += z;
            s2 += z * z;
        }
        let mean = s1 / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }
}
