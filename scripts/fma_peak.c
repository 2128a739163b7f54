/* The single-core AVX-512 FMA peak of this machine, the floor the gemm crate's GFLOP/s are
 * compared with (docs/results/candle-resnet32-blocks-2026-12-08.txt): twelve independent
 * accumulator chains of 16-lane fused multiply-adds, best of five runs of 2.4e9 FMAs each.
 *
 *   gcc -O3 -march=native scripts/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
 *
 * (-march=native keeps the twelve accumulators in registers; the values overflow to inf, which
 * costs nothing.) Needs a CPU with AVX-512F. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
  __m512 acc[12];
  __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps((float)i);
  const long iters = 200000000;
  double best = 0;
  for (int r = 0; r < 5; r++) {
    double t = now();
    for (long k = 0; k < iters; k++)
      for (int i = 0; i < 12; i++) acc[i] = _mm512_fmadd_ps(acc[i], b, c);
    double gflops = iters * 12.0 * 16 * 2 / (now() - t) / 1e9;
    if (gflops > best) best = gflops;
  }
  float sink = 0;
  for (int i = 0; i < 12; i++) sink += _mm512_reduce_add_ps(acc[i]);
  printf("AVX-512 FMA peak, one thread: %.1f GFLOP/s (sink %g)\n", best, sink);
  return 0;
}
