//! Index rules of two layers the segmentation networks share across backends: the Swin
//! Transformer's window attention and PyTorch's adaptive average pooling (UPerNet's pyramid
//! pooling). Allocation-free, per element; each backend builds its index and mask tensors
//! from them.
//!
//! - Relative position: tokens i and j of an M × M window (row-major, t = y·M + x) read row
//!   (y_i − y_j + M − 1)·(2M − 1) + (x_i − x_j + M − 1) of the bias table `[(2M − 1)², heads]`.
//! - Shifted-window regions: on a grid padded to `size` (a multiple of M) and rolled by
//!   −`shift`, coordinate v lies in region 0 below size − M, 1 below size − shift, else 2
//!   (per axis; a token's region is 3·region(y) + region(x)); attention between tokens of
//!   different regions is masked (mmsegmentation's `ShiftWindowMSA`).
//! - Adaptive average pooling of n inputs to s outputs: output i averages inputs
//!   ⌊i·n/s⌋ … ⌈(i + 1)·n/s⌉ − 1 (PyTorch's `adaptive_avg_pool`).

/// The bias-table row of tokens `i` and `j` (both < M²) of an M × M window.
///
/// ```
/// use sar_math::windows::relative_position;
/// // 2 × 2 window: token 0 is (0, 0), token 3 is (1, 1); the table has 3 × 3 rows.
/// assert_eq!(relative_position(2, 0, 3), 0); // Δ = (−1, −1)
/// assert_eq!(relative_position(2, 3, 0), 8); // Δ = (1, 1)
/// assert_eq!(relative_position(2, 1, 1), 4); // Δ = (0, 0)
/// ```
#[inline]
pub fn relative_position(m: usize, i: usize, j: usize) -> usize {
    let (yi, xi) = (i / m, i % m);
    let (yj, xj) = (j / m, j % m);
    (yi + m - 1 - yj) * (2 * m - 1) + (xi + m - 1 - xj)
}

/// The region (0, 1 or 2) of coordinate `v` along an axis of padded size `size` under a
/// cyclic shift by `shift` with window `m` (see the module docs; `m ≤ size`, `shift < m`).
///
/// ```
/// use sar_math::windows::shift_region;
/// // Size 8, window 4, shift 2: regions split at 4 and 6.
/// let r: Vec<usize> = (0..8).map(|v| shift_region(v, 8, 4, 2)).collect();
/// assert_eq!(r, [0, 0, 0, 0, 1, 1, 2, 2]);
/// ```
#[inline]
pub fn shift_region(v: usize, size: usize, m: usize, shift: usize) -> usize {
    if v < size - m {
        0
    } else if v < size - shift {
        1
    } else {
        2
    }
}

/// The input range `(start, end)` (end exclusive) averaged by output `i` of an adaptive
/// average pooling of `input` elements to `output` (both ≥ 1, `i < output`).
///
/// ```
/// use sar_math::windows::adaptive_pool_bin;
/// // 5 → 3: [0, 2), [1, 4), [3, 5) — bins overlap where 5/3 is not whole.
/// assert_eq!(adaptive_pool_bin(5, 3, 0), (0, 2));
/// assert_eq!(adaptive_pool_bin(5, 3, 1), (1, 4));
/// assert_eq!(adaptive_pool_bin(5, 3, 2), (3, 5));
/// // 2 → 6: every output reads one input.
/// assert_eq!(adaptive_pool_bin(2, 6, 4), (1, 2));
/// ```
#[inline]
pub fn adaptive_pool_bin(input: usize, output: usize, i: usize) -> (usize, usize) {
    ((i * input) / output, ((i + 1) * input).div_ceil(output))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (i, j) pair of a 3 × 3 window maps to its offset's row, the diagonal to the
    /// centre row, and the table's (2M − 1)² rows are all used.
    #[test]
    fn relative_positions_cover_the_table() {
        let m = 3;
        let mut used = [false; 25];
        for i in 0..9 {
            assert_eq!(relative_position(m, i, i), 12);
            for j in 0..9 {
                let r = relative_position(m, i, j);
                let (dy, dx) = (
                    (i / 3) as i64 - (j / 3) as i64,
                    (i % 3) as i64 - (j % 3) as i64,
                );
                assert_eq!(r as i64, (dy + 2) * 5 + dx + 2);
                used[r] = true;
            }
        }
        assert!(used.iter().all(|&u| u));
    }

    /// The bins cover the inputs in order, each non-empty, and average uniformly for whole
    /// ratios.
    #[test]
    fn adaptive_bins_cover_the_inputs() {
        for (n, s) in [(7, 3), (12, 6), (4, 4), (1, 6), (13, 1)] {
            let mut bins = [(0, 0); 6];
            for (i, b) in bins.iter_mut().enumerate().take(s) {
                *b = adaptive_pool_bin(n, s, i);
            }
            let bins = &bins[..s];
            assert_eq!(bins[0].0, 0);
            assert_eq!(bins[s - 1].1, n);
            for w in bins.windows(2) {
                assert!(w[0].0 <= w[1].0 && w[1].0 <= w[0].1);
            }
            assert!(bins.iter().all(|&(a, b)| b > a));
        }
        assert_eq!(adaptive_pool_bin(12, 6, 2), (4, 6));
    }

    /// The smallest shifted case (window 2, shift 1): the last window splits into two
    /// regions per axis, the rest is region 0.
    #[test]
    fn shift_regions_split_the_last_window() {
        let r = [0, 1, 2, 3].map(|v| shift_region(v, 4, 2, 1));
        assert_eq!(r, [0, 0, 1, 2]);
    }
}
