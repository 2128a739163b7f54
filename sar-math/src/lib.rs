//! # sar-math: Semantic Anchor Regularization, the specification in code
//!
//! SAR (Ge, Nie et al., AAAI 2024) pulls each feature toward a *semantic anchor* of its class:
//! fixed random anchors A are embedded by a small MLP (E = h_ψ(A)), classified by the model's
//! own classifier (Z = g_θ(E)) under a re-weighted cross-entropy (L_aux), averaged by EMA into
//! semantic anchors Â once the classifier separates them (the δ gate), and the features are
//! pulled to Â by an MSE (L_p2a). This crate implements every equation exactly as the released
//! code does (see `docs/spec.md` in the repository), as allocation-free kernels over
//! slices with their analytic gradients, in `f32` and `f64`.
//!
//! | module | equation | what |
//! |---|---|---|
//! | [`anchors`] | §1 | seeded portable PRNG; normal, orthogonal (OM) and simplex-ETF (MES) anchors |
//! | [`anchor_ce`] | Eq. 5–7, gate | p, ℓ, w, L_aux and dL_aux/dZ (attached or detached w); the δ gate |
//! | [`ema`] | Eq. 8 | first-pass copy, then Â ← αÂ + (1−α)E; global or per class |
//! | [`resample`] | §5 | PyTorch's legacy `nearest`, bit-exact (f32 rule) |
//! | [`p2a`] | Eq. 4 | fused L_p2a + dL/dF for NCHW and `[N, D]` (MixUp) features |
//! | [`prototype`] | Eq. 1/3, §7 | class prototypes, CAR intra-class loss (CR = p2a to A) |
//! | [`metrics`] | | confusion matrix, top-1, per-class accuracy, IoU/mIoU, head/medium/tail |
//! | [`longtail`] | §8 | CIFAR-LT per-class counts |
//! | [`disalign`] | §8.5 | DisAlign: adaptive calibration (both released forms) with gradients, generalized re-weighting |
//! | [`mislas`] | §8.4 | MiSLAS stage 2: label-aware smoothing ε_c and its cross-entropy with gradient |
//! | [`config`] | Eq. 9 | [`SarConfig`] with the paper's defaults and validation |
//! | [`state`] | §4 order | [`SarState::step`]: L_aux → gate → EMA → L_p2a |
//! | [`batch_norm`] | | BatchNorm's ε and momentum (PyTorch's) and the running-statistic names |
//! | [`sgd`] | | the SGD update rule (momentum, Nesterov, weight decay; PyTorch's) the trainers apply |
//! | `backend` | | `SarBackend`, the narrow trait tensor-library adapters implement (feature `alloc`) |
//!
//! Every function checks its lengths and parameters first and returns [`SarError`] (naming the
//! operation) instead of panicking.
//!
//! ## Features
//! `std` (default; implies `alloc`), `alloc` (heap-backed [`SarState::new`]), `libm` (routes
//! `num-traits`' float functions through libm for `no_std` users; the kernels themselves always
//! use libm, so results are the same bits everywhere), `serde` (derives for the config types).
//! Without `std` the crate builds for bare-metal (`thumbv7em-none-eabihf`) and wasm targets.
//!
//! ## One step
//! ```
//! use sar_math::{SarConfig, SarState, state::{FeatureInput, StepBuffers, StepInput}, p2a::RowLabels};
//! let mut sar = SarState::<f64, _, _>::new(SarConfig::default(), 2, 2)?;
//! let (mut p, mut l, mut w, mut pass, mut g) = ([0.0; 2], [0.0; 2], [0.0; 2], [false; 2], [0.0; 4]);
//! let report = sar.step(
//!     StepInput {
//!         anchor_logits: &[6.0, 0.0, 0.0, 6.0],  // g_θ(E): both anchors well separated
//!         embedded_anchors: &[1.0, 0.0, 0.0, 1.0],
//!         features: FeatureInput::Rows { features: &[1.0, 0.0, 0.0, 0.0], labels: RowLabels::Plain(&[0i64, 1]) },
//!     },
//!     StepBuffers { confidence: &mut p, nll: &mut l, weights: &mut w, class_pass: &mut pass,
//!                   grad_logits: None, grad_features: Some(&mut g) },
//! )?;
//! assert!(report.gate_passed);                 // first pass: Â ← E
//! assert_eq!(report.loss_p2a, 0.25);           // only feature (0,0) vs Â_1 = (0,1) differs
//! # Ok::<(), sar_math::SarError>(())
//! ```
#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(any(test, feature = "std"))]
extern crate std;

pub mod adamw;
pub mod anchor_ce;
pub mod anchors;
#[cfg(feature = "alloc")]
pub mod backend;
pub mod batch_norm;
pub mod config;
pub mod disalign;
pub mod ema;
pub mod error;
pub mod longtail;
pub mod metrics;
pub mod mislas;
pub mod p2a;
pub mod prototype;
pub mod real;
pub mod resample;
pub mod rng;
pub mod sgd;
pub mod state;
pub mod windows;

pub use anchors::AnchorKind;
pub use config::{GateMode, RegularizerKind, SarConfig, WeightMode};
pub use error::{Op, Result, SarError};
pub use real::{Label, Real};
pub use state::SarState;
