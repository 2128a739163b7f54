//! Per-thread scratch buffers kept between calls.
//!
//! The CPU convolutions (candle's `ops::conv`, `sar_dfdx::conv`) build one image's im2col /
//! patch matrix per call: tens of MB at segmentation scale, above glibc's largest mmap
//! threshold (32 MiB), so a fresh buffer per call was mapped afresh and cost a page fault per
//! 4 KiB every time. [`with_scratch`] lends each thread one buffer per element type instead,
//! grown when a call needs more and never shrunk (each thread keeps its largest).

use std::cell::RefCell;

/// An element type with a per-thread scratch buffer (f32, f64).
pub trait ScratchElem: Copy + 'static {
    /// See [`with_scratch`].
    fn with_thread_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

macro_rules! scratch_elem {
    ($t:ty) => {
        impl ScratchElem for $t {
            fn with_thread_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                thread_local! {
                    static SCRATCH: RefCell<Vec<$t>> = const { RefCell::new(Vec::new()) };
                }
                SCRATCH.with(|cell| match cell.try_borrow_mut() {
                    Ok(mut buf) => {
                        if buf.len() < len {
                            buf.resize(len, 0.0);
                        }
                        f(&mut buf[..len])
                    }
                    // A nested call (the thread's buffer is lent out): a fresh one.
                    Err(_) => f(&mut vec![0.0; len]),
                })
            }
        }
    };
}
scratch_elem!(f32);
scratch_elem!(f64);

/// Runs `f` on `len` values of this thread's scratch buffer of `T`. Its contents are
/// unspecified (whatever the last user left): callers write every value they read.
pub fn with_scratch<T: ScratchElem, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    T::with_thread_scratch(len, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffer is kept (a second call sees the first's values and the same memory), grows
    /// on demand, and a nested call gets its own buffer.
    #[test]
    fn buffers_are_kept_grown_and_not_shared_when_nested() {
        let first = with_scratch::<f32, _>(4, |b| {
            b.copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
            b.as_ptr() as usize
        });
        let again = with_scratch::<f32, _>(3, |b| {
            assert_eq!(b, &[1.0, 2.0, 3.0]);
            b.as_ptr() as usize
        });
        assert_eq!(first, again);
        with_scratch::<f32, _>(1000, |b| assert_eq!(b.len(), 1000));
        with_scratch::<f64, _>(2, |outer| {
            outer.fill(7.0);
            with_scratch::<f64, _>(2, |inner| inner.fill(9.0));
            assert_eq!(outer, &[7.0, 7.0]);
        });
    }
}
