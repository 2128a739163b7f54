//! Times one convolution forward + backward on dfdx's CPU at ResNet-32's stage-1 geometry
//! (batch 128, 32×32, 16 → 16 channels, 3×3), split into its parts: the row gather (im2col)
//! and the matmul. `cargo run --release -p sar-dfdx --example conv_profile`
use sar_dfdx::conv::{conv2d, ConvGeometry, GatherCache};
use sar_dfdx::dfdx::prelude::*;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let dev = Cpu::default();
    let (n, h, w, c) = (128, 32, 32, 16);
    let geom = ConvGeometry {
        n,
        h,
        w,
        k: 3,
        stride: 1,
        pad: 1,
    };
    let x: Tensor<(usize, usize), f32, Cpu> = dev.sample_normal_like(&(n * h * w, c));
    let wt: Tensor<(usize,), f32, Cpu> = dev.sample_normal_like(&(c * c * 9,));
    let mut cache = GatherCache::default();
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let (y, _) = conv2d(&mut cache, x.leaky_trace(), wt.retaped(), geom, c).unwrap();
        let loss = y.sum::<Rank0, _>();
        fwd.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let _ = loss.backward();
        bwd.push(t.elapsed().as_secs_f64());
    }
    let m = n * h * w;
    // The CPU im2col kernel alone.
    let (mut c_fwd, mut c_bwd) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let p = <Cpu as sar_dfdx::conv::Im2Col<f32>>::im2col(&mut cache, x.leaky_trace(), geom)
            .unwrap();
        let loss = p.sum::<Rank0, _>();
        c_fwd.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let _ = loss.backward();
        c_bwd.push(t.elapsed().as_secs_f64());
    }
    // The matmul alone: patches [M, 144] × kernel [144, 16].
    let p: Tensor<(usize, usize), f32, Cpu> = dev.sample_normal_like(&(m, 9 * c));
    let k2: Tensor<(usize, usize), f32, Cpu> = dev.sample_normal_like(&(9 * c, c));
    let (mut m_fwd, mut m_bwd) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let loss = p.leaky_trace().matmul(k2.clone()).sum::<Rank0, _>();
        m_fwd.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let _ = loss.backward();
        m_bwd.push(t.elapsed().as_secs_f64());
    }
    println!(
        "CPU im2col kernel: forward {:.1} ms, backward {:.1} ms; matmul [{m}, 144]x[144, 16] (+ sum): forward {:.1} ms, backward {:.1} ms",
        1e3 * median(c_fwd),
        1e3 * median(c_bwd),
        1e3 * median(m_fwd),
        1e3 * median(m_bwd)
    );
    {
        let g: Tensor<(usize, usize), f32, Cpu> = dev.sample_normal_like(&(m, c));
        let t = Instant::now();
        let a = g.clone().matmul(k2.clone().permute::<_, Axes2<1, 0>>());
        let ta = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let b = p.clone().permute::<_, Axes2<1, 0>>().matmul(g.clone());
        let tb = t.elapsed().as_secs_f64();
        println!(
            "dY·Kᵀ {:.1} ms, Pᵀ·dY {:.1} ms ({} {})",
            1e3 * ta,
            1e3 * tb,
            a.shape().0,
            b.shape().0
        );
    }
    let idx = dev.tensor_from_vec(geom.im2col_rows().unwrap(), (m, 9));
    let (mut g_fwd, mut g_bwd) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let padded = (x.leaky_trace(), dev.zeros_like(&(1, c))).concat_along(Axis::<0>);
        let t = Instant::now();
        let p: Tensor<(usize, usize, usize), f32, Cpu, _> = padded.gather(idx.clone());
        let loss = p.sum::<Rank0, _>();
        g_fwd.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let _ = loss.backward();
        g_bwd.push(t.elapsed().as_secs_f64());
    }
    println!(
        "conv 3x3 {n}x{h}x{w}x{c}->{c}: forward {:.1} ms, backward {:.1} ms; dfdx's generic row gather (the CUDA path): forward {:.1} ms, backward {:.1} ms (medians of 5)",
        1e3 * median(fwd),
        1e3 * median(bwd),
        1e3 * median(g_fwd),
        1e3 * median(g_bwd)
    );
}
