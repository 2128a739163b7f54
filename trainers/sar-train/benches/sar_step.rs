//! One SAR step (forward + backward) per backend at Cityscapes/HRNet and CIFAR scale, beside a
//! copy of the feature bytes; the same workloads as `sar bench` (see `sar_train::bench`).
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sar_candle::Kernels;
use sar_train::bench::{candle_runner, ndarray_runner, Workload};

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn bench(c: &mut Criterion) {
    for w in [Workload::seg(), Workload::cls()] {
        let mut group = c.benchmark_group(format!("sar_step_{}", w.name));
        group.sample_size(10);
        group.throughput(Throughput::Bytes(w.floor_bytes() as u64));
        let mut dst = vec![0f32; w.features.len()];
        group.bench_function("memcpy", |b| {
            b.iter(|| dst.copy_from_slice(std::hint::black_box(&w.features)))
        });
        let mut run = ndarray_runner(&w).unwrap();
        group.bench_function("ndarray", |b| b.iter(|| run().unwrap()));
        let mut run = candle_runner(&w, Kernels::Auto).unwrap();
        group.bench_function("candle_fused", |b| b.iter(|| run().unwrap()));
        let mut run = candle_runner(&w, Kernels::Composite).unwrap();
        group.bench_function("candle_composite", |b| b.iter(|| run().unwrap()));
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
