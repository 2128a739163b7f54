//! Dense matrix products on one thread over slices: the arithmetic of the CPU convolutions
//! (candle's `ops::conv`, `sar_dfdx::conv`), which parallelise over images themselves.
//!
//! `dst[i, j] (+)= Σ_l a[i, l] · b[l, j]` for `i < m`, `j < n`, `l < k`, where each operand is a
//! strided view of a slice: element `(i, j)` of a [`Mat`] is `data[i·row_stride + j·col_stride]`,
//! so a row-major matrix and its transpose are views of the same slice. The product is the
//! `gemm` crate's (the one candle itself uses), which picks its AVX-512, AVX2 + FMA or SSE
//! kernels at run time; this crate enables its AVX-512 kernels (feature `x86-v4`), which took
//! a candle FCN-R18-d8 training step from 6.0–7.4 s to 5.0 s on the project's 2-core AMD EPYC
//! (`docs/results/gemm-avx512-2026-12-07.txt`).
//!
//! The sums run in a fixed order for a given shape and machine, whatever the thread count of
//! the caller, so results do not depend on how many threads run the images.

/// An element type the products run on: `f32` and `f64` (sealed; the `gemm` crate panics on
/// other types, so the bound keeps every call valid).
pub trait GemmScalar: Copy + Send + Sync + 'static + sealed::Sealed {
    /// One (the scale of the product and of the accumulated destination).
    const GEMM_ONE: Self;
}

impl GemmScalar for f32 {
    const GEMM_ONE: Self = 1.0;
}
impl GemmScalar for f64 {
    const GEMM_ONE: Self = 1.0;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A read-only strided matrix view: element `(i, j)` is `data[i·row_stride + j·col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a, T> {
    data: &'a [T],
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> Mat<'a, T> {
    /// `data` as a row-major matrix with `cols` columns.
    pub fn row_major(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of `data` read as a row-major matrix with `cols` columns: element `(i, j)`
    /// is `data[j·cols + i]`.
    pub fn transposed(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }

    /// Whether every element of a `rows × cols` matrix lies inside the slice.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        reach(rows, cols, self.row_stride, self.col_stride).is_none_or(|r| r < self.data.len())
    }
}

/// A writable strided matrix view (see [`Mat`]).
#[derive(Debug)]
pub struct MatMut<'a, T> {
    data: &'a mut [T],
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> MatMut<'a, T> {
    /// `data` as a row-major matrix with `cols` columns.
    pub fn row_major(data: &'a mut [T], cols: usize) -> Self {
        MatMut {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// `data` as a column-major matrix with `rows` rows: element `(i, j)` is `data[j·rows + i]`
    /// (the row-major transpose of a `[cols, rows]` matrix).
    pub fn column_major(data: &'a mut [T], rows: usize) -> Self {
        MatMut {
            data,
            row_stride: 1,
            col_stride: rows,
        }
    }
}

/// The largest index a `rows × cols` view touches; `None` for an empty view.
fn reach(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Option<usize> {
    (rows > 0 && cols > 0).then(|| (rows - 1) * row_stride + (cols - 1) * col_stride)
}

/// `dst (+)= a · b` with `a` `m × k`, `b` `k × n`, `dst` `m × n`, on the calling thread;
/// `accumulate = false` overwrites `dst` (its old values are not read, so they may be anything).
///
/// # Panics
/// If a view reaches past its slice: the callers size their buffers from the same geometry,
/// so this is a bug in the caller, never bad user input.
pub fn matmul<T: GemmScalar>(
    (m, n, k): (usize, usize, usize),
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    dst: MatMut<'_, T>,
    accumulate: bool,
) {
    assert!(
        a.fits(m, k) && b.fits(k, n),
        "matmul: an operand view of {m}×{k} · {k}×{n} reaches past its slice"
    );
    assert!(
        reach(m, n, dst.row_stride, dst.col_stride).is_none_or(|r| r < dst.data.len()),
        "matmul: the {m}×{n} destination view reaches past its slice"
    );
    let stride = |s: usize| s as isize;
    // SAFETY: the asserts keep every index the product reads or writes inside the slices (a
    // `k = 0` product reads neither operand); `dst` is borrowed exclusively; `T` is f32 or f64
    // (sealed), the types the gemm crate implements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            stride(dst.col_stride),
            stride(dst.row_stride),
            accumulate,
            a.data.as_ptr(),
            stride(a.col_stride),
            stride(a.row_stride),
            b.data.as_ptr(),
            stride(b.col_stride),
            stride(b.row_stride),
            T::GEMM_ONE,
            T::GEMM_ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f64> {
        let mut rng = sar_math::rng::SeededRng::new(seed);
        (0..len).map(|_| rng.next_normal()).collect()
    }

    /// A logical row-major `rows × cols` matrix stored as is or transposed.
    fn store(vals: &[f64], rows: usize, cols: usize, transposed: bool) -> Vec<f64> {
        if !transposed {
            return vals.to_vec();
        }
        let mut s = vec![0.0; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                s[j * rows + i] = vals[i * cols + j];
            }
        }
        s
    }

    /// The view of `store(vals, rows, cols, transposed)` that reads the logical matrix.
    fn view<T>(s: &[T], rows: usize, cols: usize, transposed: bool) -> Mat<'_, T> {
        if transposed {
            Mat::transposed(s, rows)
        } else {
            Mat::row_major(s, cols)
        }
    }

    /// One product in element type `T` with the given layouts; returns the logical row-major
    /// result. Without `accumulate` the destination starts as NaN, which must not leak.
    fn product<T: GemmScalar>(
        (m, n, k): (usize, usize, usize),
        (a, b, d): (&[f64], &[f64], &[f64]),
        (a_t, b_t, d_cm, accumulate): (bool, bool, bool, bool),
        to: impl Fn(f64) -> T,
        from: impl Fn(T) -> f64,
    ) -> Vec<f64> {
        let conv = |v: Vec<f64>| v.into_iter().map(&to).collect::<Vec<T>>();
        let (a_s, b_s) = (conv(store(a, m, k, a_t)), conv(store(b, k, n, b_t)));
        let start = if accumulate {
            d.to_vec()
        } else {
            vec![f64::NAN; m * n]
        };
        let mut dst = conv(store(&start, m, n, d_cm));
        let dst_view = if d_cm {
            MatMut::column_major(&mut dst, m)
        } else {
            MatMut::row_major(&mut dst, n)
        };
        let (a_v, b_v) = (view(&a_s, m, k, a_t), view(&b_s, k, n, b_t));
        matmul((m, n, k), a_v, b_v, dst_view, accumulate);
        let flat: Vec<f64> = dst.into_iter().map(from).collect();
        if d_cm {
            store(&flat, n, m, true)
        } else {
            flat
        }
    }

    /// Every combination of plain and transposed operands and row- or column-major
    /// destination, overwriting and accumulating, in f64 and f32, against the definition in
    /// f64; shapes below and above the kernels' register tiles, and k = 0.
    #[test]
    fn matches_the_definition_for_every_layout() {
        for (m, n, k) in [(1, 1, 1), (3, 5, 7), (17, 33, 9), (64, 70, 130), (5, 4, 0)] {
            let (a, b, d) = (values(m * k, 1), values(k * n, 2), values(m * n, 3));
            for bits in 0..16u32 {
                let layout = (bits & 1 > 0, bits & 2 > 0, bits & 4 > 0, bits & 8 > 0);
                let mut expect = if layout.3 {
                    d.clone()
                } else {
                    vec![0.0; m * n]
                };
                for i in 0..m {
                    for j in 0..n {
                        for l in 0..k {
                            expect[i * n + j] += a[i * k + l] * b[l * n + j];
                        }
                    }
                }
                let shape = (m, n, k);
                let got64 = product(shape, (&a, &b, &d), layout, |v| v, |v| v);
                let got32 = product(shape, (&a, &b, &d), layout, |v| v as f32, f64::from);
                for (idx, e) in expect.iter().enumerate() {
                    let what = format!("{m}×{n}×{k} {layout:?} element {idx}");
                    assert!(
                        (got64[idx] - e).abs() <= 1e-12 * (1.0 + e.abs()),
                        "f64 {what}: {} vs {e}",
                        got64[idx]
                    );
                    let tol = 1e-6 * (k as f64 + 1.0) * (1.0 + e.abs());
                    assert!(
                        (got32[idx] - e).abs() <= tol,
                        "f32 {what}: {} vs {e}",
                        got32[idx]
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "reaches past its slice")]
    fn a_view_past_its_slice_is_refused() {
        let a = [1.0f32; 5];
        let b = [1.0f32; 6];
        let mut d = [0.0f32; 4];
        matmul(
            (2, 2, 3),
            Mat::row_major(&a, 3),
            Mat::row_major(&b, 2),
            MatMut::row_major(&mut d, 2),
            false,
        );
    }
}
