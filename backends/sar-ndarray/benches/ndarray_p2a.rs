//! The parallel fused p2a (all of rayon's threads) at Cityscapes/HRNet scale (B = 2, D = 720,
//! 128×256 features, 512×1024 labels, C = 19) beside a memory copy of the same bytes, single-
//! and multi-threaded, in the same run. Throughput counts bytes read + written.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::{Array3, Array4};
use rayon::prelude::*;
use sar_math::p2a::P2aTargets;
use sar_math::rng::SeededRng;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let (b, d, h, w, classes) = (2, 720, 128, 256, 19);
    let mut rng = SeededRng::new(1);
    let features = Array4::<f32>::from_shape_fn((b, d, h, w), |(i, j, k, l)| {
        ((i + j * 7 + k * 13 + l) % 977) as f32 * 1e-3
    });
    let labels = Array3::<u8>::from_shape_fn((b, 512, 1024), |(_, y, _)| {
        if y < 40 {
            255
        } else {
            (rng.next_u64() % classes as u64) as u8
        }
    });
    let anchors: Vec<f32> = (0..classes * d).map(|_| rng.next_normal() as f32).collect();
    let targets = P2aTargets {
        anchors: &anchors,
        classes,
        ignore_index: 255,
        class_active: None,
    };
    let mut grad = Array4::<f32>::zeros((b, d, h, w));
    let n = features.len();
    let mut group = c.benchmark_group("ndarray_p2a_cityscapes_f32");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((2 * n * 4) as u64));
    let (src, dst) = (features.as_slice().unwrap(), grad.as_slice_mut().unwrap());
    group.bench_function("memcpy_1_thread", |bn| {
        bn.iter(|| dst.copy_from_slice(black_box(src)))
    });
    let chunk = n.div_ceil(rayon::current_num_threads());
    group.bench_function("memcpy_all_threads", |bn| {
        bn.iter(|| {
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s))
        })
    });
    group.bench_function("fused_p2a_parallel", |bn| {
        bn.iter(|| {
            sar_ndarray::p2a_nchw_parallel(
                black_box(features.view()),
                labels.view(),
                &targets,
                Some(grad.view_mut()),
                1.0,
            )
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
