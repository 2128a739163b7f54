/* One SAR step through the C ABI (include/sar.h), in double and in float, and each kind of
 * error. Prints every input and output as "name v1 v2 ..." (%.17g) so that a test can check
 * the step against sar-math (backends/sar-capi/tests/c_example.rs compiles and runs this).
 *
 *   cc -std=c99 -I backends/sar-capi/include backends/sar-capi/examples/step.c \
 *      target/debug/libsar_capi.a -lpthread -ldl -lm -o step && ./step
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "sar.h"

enum { C = 3, D = 4, B = 1, H = 3, W = 3, LH = 5, LW = 5 };

static void print_d(const char *name, const double *v, size_t n) {
  printf("%s", name);
  for (size_t i = 0; i < n; i++) printf(" %.17g", v[i]);
  printf("\n");
}
static void print_f(const char *name, const float *v, size_t n) {
  printf("%s", name);
  for (size_t i = 0; i < n; i++) printf(" %.9g", (double)v[i]);
  printf("\n");
}
static void print_b(const char *name, const bool *v, size_t n) {
  printf("%s", name);
  for (size_t i = 0; i < n; i++) printf(" %d", v[i] ? 1 : 0);
  printf("\n");
}
static void print_report(const char *name, const SarStepReport *r) {
  printf("%s %.17g %.17g %.17g %d %zu %zu %zu\n", name, r->loss_aux, r->loss_p2a, r->loss_sar,
         r->gate_passed ? 1 : 0, r->updated_classes, r->uncertain, r->valid);
}
static void print_err(const char *what, SarStatus s) {
  printf("err %s %d %s %s\n", what, (int)s, sar_status_name((int)s), sar_last_error_message());
}

/* A small deterministic generator (no rand(): the same numbers everywhere). */
static unsigned long long seed = 2024;
static double uniform(void) {
  seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
  return (double)(seed >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

int main(void) {
  double logits[C * C], embedded[C * D], semantic[C * D], features[B * D * H * W];
  int64_t labels[B * LH * LW];
  bool initialized[C] = {true, true, true};
  for (int i = 0; i < C * C; i++) logits[i] = uniform();
  for (int c = 0; c < C; c++) logits[c * C + c] += 6.0; /* separated: the gate passes */
  for (int i = 0; i < C * D; i++) embedded[i] = uniform();
  for (int i = 0; i < C * D; i++) semantic[i] = 0.5 * uniform();
  for (int i = 0; i < B * D * H * W; i++) features[i] = uniform();
  for (int i = 0; i < B * LH * LW; i++) labels[i] = (i % 7 == 3) ? 255 : (i / 2) % C;
  size_t feature_shape[4] = {B, D, H, W}, label_shape[3] = {B, LH, LW};

  print_d("in.anchor_logits", logits, C * C);
  print_d("in.embedded_anchors", embedded, C * D);
  print_d("in.semantic_anchors", semantic, C * D);
  print_d("in.features", features, B * D * H * W);
  printf("in.labels");
  for (int i = 0; i < B * LH * LW; i++) printf(" %lld", (long long)labels[i]);
  printf("\n");

  SarOptions opt = sar_options_default();

  /* double */
  {
    double sem[C * D], conf[C], nll[C], w[C], gl[C * C], gf[B * D * H * W];
    bool init[C], pass[C];
    SarStepReport r;
    memcpy(sem, semantic, sizeof sem);
    memcpy(init, initialized, sizeof init);
    SarStatus s = sar_step_f64(&opt, C, D, logits, embedded, sem, init, features, feature_shape, 4,
                               labels, label_shape, conf, nll, w, pass, gl, gf, &r);
    if (s != SAR_OK) { print_err("f64", s); return 1; }
    print_d("f64.anchor_confidence", conf, C);
    print_d("f64.anchor_nll", nll, C);
    print_d("f64.anchor_weights", w, C);
    print_d("f64.grad_anchor_logits", gl, C * C);
    print_b("f64.gate", pass, C);
    print_d("f64.semantic_anchors", sem, C * D);
    print_b("f64.initialized", init, C);
    print_d("f64.grad_features", gf, B * D * H * W);
    print_report("f64.report", &r);
  }

  /* float: the same inputs rounded to float */
  {
    float lf[C * C], ef[C * D], sf[C * D], ff[B * D * H * W], conf[C], nll[C], w[C], gl[C * C],
        gf[B * D * H * W];
    bool init[C], pass[C];
    SarStepReport r;
    for (int i = 0; i < C * C; i++) lf[i] = (float)logits[i];
    for (int i = 0; i < C * D; i++) { ef[i] = (float)embedded[i]; sf[i] = (float)semantic[i]; }
    for (int i = 0; i < B * D * H * W; i++) ff[i] = (float)features[i];
    memcpy(init, initialized, sizeof init);
    SarStatus s = sar_step_f32(&opt, C, D, lf, ef, sf, init, ff, feature_shape, 4, labels,
                               label_shape, conf, nll, w, pass, gl, gf, &r);
    if (s != SAR_OK) { print_err("f32", s); return 1; }
    print_f("f32.anchor_confidence", conf, C);
    print_f("f32.grad_anchor_logits", gl, C * C);
    print_f("f32.semantic_anchors", sf, C * D);
    print_f("f32.grad_features", gf, B * D * H * W);
    print_report("f32.report", &r);
  }

  /* Errors: each returns its status and leaves a message naming the problem. */
  {
    double sem[C * D], conf[C], nll[C], w[C];
    bool init[C], pass[C];
    SarStepReport r;
    memcpy(sem, semantic, sizeof sem);
    memcpy(init, initialized, sizeof init);
#define STEP(opt_, classes_, feats_, labs_, shape_, rank_) \
  sar_step_f64(opt_, classes_, D, logits, embedded, sem, init, feats_, shape_, rank_, labs_, \
               label_shape, conf, nll, w, pass, NULL, NULL, &r)
    print_err("null_features", STEP(&opt, C, NULL, labels, feature_shape, 4));
    print_err("null_options", STEP(NULL, C, features, labels, feature_shape, 4));
    int64_t bad_labels[B * LH * LW];
    memcpy(bad_labels, labels, sizeof bad_labels);
    bad_labels[7] = C; /* label = C: not a class, not the ignore index */
    print_err("label", STEP(&opt, C, features, bad_labels, feature_shape, 4));
    print_err("zero_classes", STEP(&opt, 0, features, labels, feature_shape, 4));
    print_err("rank", STEP(&opt, C, features, labels, feature_shape, 3));
    SarOptions bad = opt;
    bad.tau = 2.0;
    print_err("tau", STEP(&bad, C, features, labels, feature_shape, 4));
    bad = opt;
    bad.gate = 7;
    print_err("gate_enum", STEP(&bad, C, features, labels, feature_shape, 4));
    double nan_features[B * D * H * W];
    memcpy(nan_features, features, sizeof nan_features);
    double saved = logits[4];
    logits[4] = NAN;
    print_err("nan_logits", STEP(&opt, C, features, labels, feature_shape, 4));
    logits[4] = saved;
    /* Â must be untouched by the failed calls. */
    print_d("after_errors.semantic_anchors", sem, C * D);
#undef STEP
    /* A kernel: the anchor cross-entropy with a null value pointer, then a zero-size call. */
    SarAnchorCeValue v;
    print_err("ce_null_value", sar_anchor_ce_f64(logits, C, 0.9, SAR_WEIGHTS_ATTACHED, conf, nll,
                                                 w, NULL, NULL));
    print_err("ce_zero_classes", sar_anchor_ce_f64(NULL, 0, 0.9, SAR_WEIGHTS_ATTACHED, NULL, NULL,
                                                   NULL, NULL, &v));
    print_err("ok_after", sar_anchor_ce_f64(logits, C, 0.9, SAR_WEIGHTS_DETACHED, conf, nll, w,
                                            NULL, &v));
    (void)nan_features;
  }
  return 0;
}
