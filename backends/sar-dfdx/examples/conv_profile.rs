//! Times one 3×3 convolution forward + backward on dfdx's CPU at the three stage geometries of
//! ResNet-32 with batch 128 (32×32×16, 16×16×32, 8×8×64; stride 1, padding 1): the CPU op
//! (`ConvKernel for Cpu`) beside the generic path of dfdx ops (row gather + matmul, what CUDA
//! runs), interleaved, medians of 5; and the same for the training-mode BatchNorm + ReLU that
//! follows each convolution (`BatchNormKernel for Cpu` beside `batch_norm_train_generic`).
//! `cargo run --release -p sar-dfdx --example conv_profile`
use sar_dfdx::conv::{conv_rows_generic, ConvGeometry, ConvKernel, GatherCache};
use sar_dfdx::dfdx::prelude::*;
use sar_dfdx::norm::{batch_norm_train_generic, BatchNormKernel};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

type Rows = Tensor<(usize, usize), f32, Cpu>;
type Traced = Tensor<(usize, usize), f32, Cpu, OwnedTape<f32, Cpu>>;

/// (forward, backward) seconds of one run of `conv` on traced `x` and `kernel`.
fn time_once(
    x: &Rows,
    kernel: &Rows,
    mut conv: impl FnMut(Traced, Traced) -> Traced,
) -> (f64, f64) {
    let t = Instant::now();
    let loss = conv(x.leaky_trace(), kernel.retaped()).sum::<Rank0, _>();
    let forward = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let _ = loss.backward();
    (forward, t.elapsed().as_secs_f64())
}

fn main() {
    let dev = Cpu::default();
    for (h, c) in [(32, 16), (16, 32), (8, 64)] {
        let n = 128;
        let geom = ConvGeometry::new(n, (h, h), 3, 1, 1);
        let x: Rows = dev.sample_normal_like(&(n * h * h, c));
        let kernel: Rows = dev.sample_normal_like(&(9 * c, c));
        let (mut op_cache, mut generic_cache) = (GatherCache::default(), GatherCache::default());
        let mut op = (Vec::new(), Vec::new());
        let mut generic = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let (f, b) = time_once(&x, &kernel, |x, k| {
                <Cpu as ConvKernel<f32>>::conv_rows(&mut op_cache, x, k, geom).unwrap()
            });
            op.0.push(f);
            op.1.push(b);
            let (f, b) = time_once(&x, &kernel, |x, k| {
                conv_rows_generic(&mut generic_cache, x, k, geom).unwrap()
            });
            generic.0.push(f);
            generic.1.push(b);
        }
        let gamma: Tensor<(usize,), f32, Cpu> = dev.sample_normal_like(&(c,));
        let beta: Tensor<(usize,), f32, Cpu> = dev.sample_normal_like(&(c,));
        let mut bn_op = (Vec::new(), Vec::new());
        let mut bn_generic = (Vec::new(), Vec::new());
        for _ in 0..5 {
            for (generic, times) in [(false, &mut bn_op), (true, &mut bn_generic)] {
                let t = Instant::now();
                let (g, b) = (gamma.retaped(), beta.retaped());
                let (y, _, _) = if generic {
                    batch_norm_train_generic(x.leaky_trace(), g, b, 1e-5, true).unwrap()
                } else {
                    <Cpu as BatchNormKernel<f32>>::batch_norm_train(
                        x.leaky_trace(),
                        g,
                        b,
                        1e-5,
                        true,
                    )
                    .unwrap()
                };
                let loss = y.sum::<Rank0, _>();
                times.0.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                let _ = loss.backward();
                times.1.push(t.elapsed().as_secs_f64());
            }
        }
        let ms = |v: Vec<f64>| 1e3 * median(v);
        println!(
            "conv 3x3 {n}x{h}x{h}x{c}->{c}: CPU op forward {:.1} ms, backward {:.1} ms; generic gather+matmul forward {:.1} ms, backward {:.1} ms",
            ms(op.0),
            ms(op.1),
            ms(generic.0),
            ms(generic.1)
        );
        println!(
            "  batch norm + ReLU {}x{c}: CPU op forward {:.1} ms, backward {:.1} ms; generic forward {:.1} ms, backward {:.1} ms",
            n * h * h,
            ms(bn_op.0),
            ms(bn_op.1),
            ms(bn_generic.0),
            ms(bn_generic.1)
        );
    }
}
