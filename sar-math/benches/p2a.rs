//! Fused p2a loss + gradient at Cityscapes/HRNet scale (B = 2, D = 720, 128×256 features,
//! 512×1024 labels, C = 19), single-threaded, beside a memory copy of the same bytes.
//!
//! Both report throughput as read + written bytes (features in, gradient out; source in,
//! destination out), so their GB/s compare directly: the copy is the floor.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sar_math::p2a::{p2a_nchw, FeatureGeometry, P2aTargets};
use sar_math::rng::SeededRng;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let g = FeatureGeometry {
        batch: 2,
        channels: 720,
        height: 128,
        width: 256,
        label_height: 512,
        label_width: 1024,
    };
    let classes = 19;
    let n = g.feature_len().unwrap();
    let mut rng = SeededRng::new(1);
    let features: Vec<f32> = (0..n).map(|i| (i % 977) as f32 * 1e-3).collect();
    // Random labels (the PyTorch peer's input), with the top 40 label rows ignored.
    let labels: Vec<u8> = (0..g.label_len().unwrap())
        .map(|i| {
            if (i / 1024) % 512 < 40 {
                255
            } else {
                (rng.next_u64() % classes as u64) as u8
            }
        })
        .collect();
    let anchors: Vec<f32> = (0..classes * 720)
        .map(|_| rng.next_normal() as f32)
        .collect();
    let targets = P2aTargets {
        anchors: &anchors,
        classes,
        ignore_index: 255,
        class_active: None,
    };
    let mut grad = vec![0f32; n];
    let bytes = (2 * n * std::mem::size_of::<f32>()) as u64;

    let mut group = c.benchmark_group("p2a_cityscapes_f32");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("memcpy", |b| {
        b.iter(|| grad.copy_from_slice(black_box(&features)))
    });
    group.bench_function("fused_p2a_loss_grad", |b| {
        b.iter(|| p2a_nchw(black_box(&features), &labels, &g, &targets, Some(&mut grad)).unwrap())
    });
    group.bench_function("p2a_loss_only", |b| {
        b.iter(|| p2a_nchw(black_box(&features), &labels, &g, &targets, None).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
