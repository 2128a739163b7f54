//! Turning stored images into normalised float batches, with the CIFAR training augmentation
//! and MixUp, reproducible from counters rather than from a running generator.
//!
//! Every random choice for sample `position` of epoch `epoch` comes from
//! [`sample_rng`]`(seed, epoch, position)`, so a batch is a pure function of (seed, epoch,
//! batch index): resuming at any step gives the same batches as an uninterrupted run, and the
//! samples of a batch can be rendered in parallel in any order.
//!
//! Output layout: `[N, C, H, W]` f32, values `(p / max_value − mean_c) / std_c` (PyTorch's
//! `ToTensor` then `Normalize`). [`Augment::CropFlip`] is the CIFAR recipe: zero-pad the stored
//! image by `pad` pixels on each side (before normalisation, as torchvision pads the PIL
//! image), take a random crop of the original size, flip horizontally with probability ½.

use crate::ImageSet;
use rayon::prelude::*;
use sar_math::rng::{splitmix64, SeededRng};

/// The training-time transformation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Augment {
    /// The image as stored.
    None,
    /// Random crop with zero padding, then (if `flip`) random horizontal flip.
    CropFlip {
        /// Pixels of zero padding on each side (4 for CIFAR).
        pad: usize,
        /// Flip horizontally with probability ½ (off for digits, whose mirror images are other
        /// shapes).
        flip: bool,
    },
}

/// Per-channel normalisation.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalize {
    /// Mean per channel (of `p / max_value`).
    pub mean: Vec<f32>,
    /// Standard deviation per channel.
    pub std: Vec<f32>,
}

impl Normalize {
    /// Mean and standard deviation per channel measured on `set`.
    pub fn measure(set: &ImageSet) -> Normalize {
        let (c, hw) = (set.channels, set.height * set.width);
        let scale = 1.0 / set.max_value.max(1) as f64;
        let mut sum = vec![0.0f64; c];
        let mut sq = vec![0.0f64; c];
        for img in set.images.chunks_exact(set.image_len().max(1)) {
            for ch in 0..c {
                for &p in &img[ch * hw..(ch + 1) * hw] {
                    let v = p as f64 * scale;
                    sum[ch] += v;
                    sq[ch] += v * v;
                }
            }
        }
        let n = (set.len() * hw).max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(s, m)| ((s / n - m * m).max(0.0).sqrt().max(1e-6)) as f32)
            .collect();
        Normalize {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            std,
        }
    }
}

/// The generator of sample `position` in epoch `epoch` of a run seeded `seed`.
pub fn sample_rng(seed: u64, epoch: u64, position: u64) -> SeededRng {
    let mut s = seed ^ 0x5341_525F_4155_4721;
    let a = splitmix64(&mut s);
    let mut s = a ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let b = splitmix64(&mut s);
    SeededRng::new(b ^ position.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// The order of the `n` training samples in `epoch` (a seeded Fisher–Yates shuffle).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = sample_rng(seed ^ 0x004F_5244_4552, epoch, u64::MAX);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    order
}

/// A seeded Fisher–Yates shuffle of `items` in place.
fn shuffle(items: &mut [usize], rng: &mut SeededRng) {
    for i in (1..items.len()).rev() {
        items.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
}

/// A list visited in turn, reshuffled each time it starts over (Decoupling's
/// `RandomCycleIter`: the first visit is shuffled too).
struct Cycle {
    items: Vec<usize>,
    next: usize,
}

impl Cycle {
    fn take(&mut self, rng: &mut SeededRng) -> usize {
        if self.next == 0 {
            shuffle(&mut self.items, rng);
        }
        let v = self.items[self.next];
        self.next = (self.next + 1) % self.items.len();
        v
    }
}

/// The class-balanced order of one epoch (the `ClassAwareSampler` of Decoupling and MiSLAS):
/// `labels[i]` is sample i's class; an epoch has C·max_c n_c samples (C the classes that have
/// samples). Classes are visited from a cycle of the classes, reshuffled whenever it starts
/// over; each visit takes `per_class` consecutive samples from that class's own reshuffled
/// cycle. So every class is drawn about equally often, whatever its size.
///
/// Unlike Decoupling's sampler, whose cycles carry on from one epoch to the next, the cycles
/// start afresh each epoch from a generator of (seed, epoch), so that an epoch's order is a
/// function of the seed and the epoch alone, as exact resume needs.
pub fn class_balanced_order(
    labels: &[usize],
    per_class: usize,
    seed: u64,
    epoch: u64,
) -> Vec<usize> {
    let classes = labels.iter().max().map_or(0, |&m| m + 1);
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &y) in labels.iter().enumerate() {
        members[y].push(i);
    }
    let mut cycles: Vec<Cycle> = members
        .into_iter()
        .filter(|m| !m.is_empty())
        .map(|items| Cycle { items, next: 0 })
        .collect();
    let Some(largest) = cycles.iter().map(|c| c.items.len()).max() else {
        return Vec::new();
    };
    let total = largest * cycles.len();
    let mut rng = sample_rng(seed ^ 0x0043_4C41_5353, epoch, u64::MAX);
    let mut class_cycle = Cycle {
        items: (0..cycles.len()).collect(),
        next: 0,
    };
    let per_class = per_class.max(1);
    let mut order = Vec::with_capacity(total);
    while order.len() < total {
        let c = class_cycle.take(&mut rng);
        for _ in 0..per_class.min(total - order.len()) {
            order.push(cycles[c].take(&mut rng));
        }
    }
    order
}

/// The random choices of one sample: the crop's offset (dy, dx) ∈ [−pad, pad]² from the
/// image's own position and whether it is flipped. Output pixel (y, x) is stored pixel
/// (y + dy, x' + dx) with x' = W − 1 − x when flipped (x otherwise), zero outside the image;
/// i.e. the crop of the zero-padded image at (pad + dy, pad + dx), then mirrored.
pub fn draw(augment: Augment, rng: &mut SeededRng) -> (isize, isize, bool) {
    match augment {
        Augment::None => (0, 0, false),
        Augment::CropFlip { pad, flip } => {
            let span = (2 * pad + 1) as u64;
            let dy = (rng.next_u64() % span) as isize - pad as isize;
            let dx = (rng.next_u64() % span) as isize - pad as isize;
            (dy, dx, rng.next_u64() & 1 == 1 && flip)
        }
    }
}

/// Renders image `index` of `set` into `out` (`C·H·W` floats).
pub fn render(
    set: &ImageSet,
    index: usize,
    augment: Augment,
    norm: &Normalize,
    rng: &mut SeededRng,
    out: &mut [f32],
) {
    let (c, h, w) = (set.channels, set.height, set.width);
    let img = set.image(index).expect("index checked by the caller");
    let scale = 1.0 / set.max_value.max(1) as f32;
    let (dy, dx, flip) = draw(augment, rng);
    for ch in 0..c {
        let (m, s) = (norm.mean[ch], norm.std[ch]);
        let zero = (0.0 - m) / s;
        for y in 0..h {
            let sy = y as isize + dy;
            for x in 0..w {
                let xo = if flip { w - 1 - x } else { x };
                let sx = xo as isize + dx;
                let v = if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                    zero
                } else {
                    (img[ch * h * w + sy as usize * w + sx as usize] as f32 * scale - m) / s
                };
                out[ch * h * w + y * w + x] = v;
            }
        }
    }
}

/// Renders the samples `indices` (their positions in the epoch start at `first_position`) in
/// parallel; returns `[N, C, H, W]` floats and the labels.
pub fn render_batch(
    set: &ImageSet,
    indices: &[usize],
    augment: Augment,
    norm: &Normalize,
    seed: u64,
    epoch: u64,
    first_position: u64,
) -> (Vec<f32>, Vec<u32>) {
    let len = set.image_len();
    let mut x = vec![0.0f32; indices.len() * len];
    x.par_chunks_mut(len.max(1))
        .zip(indices.par_iter().enumerate())
        .for_each(|(out, (k, &i))| {
            let mut rng = sample_rng(seed, epoch, first_position + k as u64);
            render(set, i, augment, norm, &mut rng, out);
        });
    let y = indices.iter().map(|&i| set.labels[i]).collect();
    (x, y)
}

/// A Gamma(shape, 1) variate (Marsaglia–Tsang; shape < 1 by the boost Γ(a) = Γ(a+1)·U^(1/a)).
pub fn sample_gamma(shape: f64, rng: &mut SeededRng) -> f64 {
    if shape < 1.0 {
        let u = rng.next_f64().max(f64::MIN_POSITIVE);
        return sample_gamma(shape + 1.0, rng) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let z = rng.next_normal();
        let v = (1.0 + c * z).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = rng.next_f64();
        if u.ln() < 0.5 * z * z + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// A Beta(α, α) variate: MixUp's λ.
pub fn sample_beta(alpha: f64, rng: &mut SeededRng) -> f64 {
    let a = sample_gamma(alpha, rng);
    let b = sample_gamma(alpha, rng);
    if a + b == 0.0 {
        0.5
    } else {
        a / (a + b)
    }
}

/// MixUp's random choices for batch `batch_index` of `epoch` with `n` samples: λ ~ Beta(α, α)
/// and the partner permutation π (a seeded Fisher–Yates shuffle), both from the batch's own
/// generator.
pub fn mixup_draw(
    n: usize,
    alpha: f64,
    seed: u64,
    epoch: u64,
    batch_index: u64,
) -> (f64, Vec<usize>) {
    let mut rng = sample_rng(seed ^ 0x004D_4958_5550, epoch, batch_index);
    let lambda = sample_beta(alpha, &mut rng);
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        perm.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    (lambda, perm)
}

/// MixUp of a rendered batch (Zhang et al.): λ ~ Beta(α, α) and a permutation π of the batch,
/// both from the batch's own generator; `x ← λ·x + (1−λ)·x[π]`. Returns (λ, π).
pub fn mixup(
    x: &mut [f32],
    image_len: usize,
    alpha: f64,
    seed: u64,
    epoch: u64,
    batch_index: u64,
) -> (f64, Vec<usize>) {
    let n = x.len() / image_len.max(1);
    let (lambda, perm) = mixup_draw(n, alpha, seed, epoch, batch_index);
    let original = x.to_vec();
    let (l, m) = (lambda as f32, (1.0 - lambda) as f32);
    x.par_chunks_mut(image_len.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            let other = &original[perm[i] * image_len..(perm[i] + 1) * image_len];
            for (v, o) in row.iter_mut().zip(other) {
                *v = l * *v + m * o;
            }
        });
    (lambda, perm)
}

#[cfg(test)]
mod tests {

    #[test]
    fn class_balanced_order_draws_every_class_equally() {
        // Classes of 8, 2 and 1 samples (labels interleaved), one class index unused.
        let mut labels = vec![0usize; 8];
        labels.extend([1, 1, 3]);
        let order = class_balanced_order(&labels, 1, 7, 0);
        assert_eq!(order.len(), 3 * 8, "C · max n_c, over the classes present");
        let mut per_class = [0usize; 4];
        for &i in &order {
            per_class[labels[i]] += 1;
        }
        // One class per visit from a cycle of the 3 classes: 8 visits each.
        assert_eq!(per_class, [8, 8, 0, 8]);
        // The class cycle is a permutation of the classes every 3 draws.
        for chunk in order.chunks(3) {
            let mut c: Vec<usize> = chunk.iter().map(|&i| labels[i]).collect();
            c.sort_unstable();
            assert_eq!(c, [0, 1, 3]);
        }
        // Within a class, its cycle visits each member once before repeating.
        let ones: Vec<usize> = order.iter().copied().filter(|&i| labels[i] == 1).collect();
        for pair in ones.chunks(2) {
            let mut p = pair.to_vec();
            p.sort_unstable();
            assert_eq!(p, [8, 9]);
        }
        let zeros: Vec<usize> = order.iter().copied().filter(|&i| labels[i] == 0).collect();
        let mut z = zeros.clone();
        z.sort_unstable();
        assert_eq!(z, (0..8).collect::<Vec<_>>());
        // A function of seed and epoch.
        assert_eq!(order, class_balanced_order(&labels, 1, 7, 0));
        assert_ne!(order, class_balanced_order(&labels, 1, 7, 1));
        assert!(class_balanced_order(&[], 1, 7, 0).is_empty());
    }

    #[test]
    fn class_balanced_order_takes_runs_of_one_class() {
        let labels = [0usize, 0, 0, 0, 1, 1];
        let order = class_balanced_order(&labels, 2, 3, 5);
        assert_eq!(order.len(), 8);
        for pair in order.chunks(2) {
            assert_eq!(labels[pair[0]], labels[pair[1]], "{order:?}");
        }
    }
    use super::*;

    fn set() -> ImageSet {
        // One 1×3×4 image with pixels 0..12 (max 16: exact in binary), label 2.
        ImageSet {
            name: "t".into(),
            channels: 1,
            height: 3,
            width: 4,
            classes: 3,
            max_value: 16,
            images: (0..12).collect(),
            labels: vec![2],
        }
    }

    #[test]
    fn identity_normalisation_and_crop_flip_geometry() {
        let s = set();
        let norm = Normalize {
            mean: vec![0.0],
            std: vec![1.0 / 16.0],
        };
        let mut out = vec![0.0; 12];
        render(
            &s,
            0,
            Augment::None,
            &norm,
            &mut SeededRng::new(1),
            &mut out,
        );
        assert_eq!(out, (0..12).map(|v| v as f32).collect::<Vec<_>>());
        // Every crop/flip draw is a shifted (and maybe mirrored) copy with zero fill: check the
        // pixel relation for many draws, so a label/pixel misalignment cannot hide.
        for seed in 0..200 {
            let mut rng = SeededRng::new(seed);
            render(
                &s,
                0,
                Augment::CropFlip { pad: 2, flip: true },
                &norm,
                &mut rng,
                &mut out,
            );
            let mut rng = SeededRng::new(seed);
            let dy = (rng.next_u64() % 5) as isize - 2;
            let dx = (rng.next_u64() % 5) as isize - 2;
            let flip = rng.next_u64() & 1 == 1;
            for y in 0..3isize {
                for x in 0..4isize {
                    let xo = if flip { 3 - x } else { x };
                    let (sy, sx) = (y + dy, xo + dx);
                    let want = if (0..3).contains(&sy) && (0..4).contains(&sx) {
                        (sy * 4 + sx) as f32
                    } else {
                        0.0
                    };
                    assert_eq!(out[(y * 4 + x) as usize], want, "seed {seed} y {y} x {x}");
                }
            }
        }
    }

    #[test]
    fn batches_depend_only_on_seed_epoch_and_position() {
        let mut s = set();
        s.images = (0..48).map(|v| (v % 13) as u8).collect();
        s.labels = vec![0, 1, 2, 0];
        let norm = Normalize::measure(&s);
        let aug = Augment::CropFlip { pad: 1, flip: true };
        let (a, ya) = render_batch(&s, &[3, 1, 2], aug, &norm, 9, 4, 10);
        let (b, _) = render_batch(&s, &[3, 1, 2], aug, &norm, 9, 4, 10);
        assert_eq!(a, b);
        assert_eq!(ya, vec![0, 1, 2]);
        // The second sample alone, at its position, renders the same.
        let (c, _) = render_batch(&s, &[1], aug, &norm, 9, 4, 11);
        assert_eq!(&a[12..24], &c[..]);
        assert_ne!(epoch_order(100, 1, 0), epoch_order(100, 1, 1));
        assert_eq!(epoch_order(100, 1, 3), epoch_order(100, 1, 3));
    }

    #[test]
    fn beta_samples_have_the_right_mean_and_variance() {
        // Beta(α, α): mean ½, variance 1/(4(2α+1)).
        for alpha in [0.2, 1.0, 2.0] {
            let mut rng = SeededRng::new(3);
            let v: Vec<f64> = (0..40_000).map(|_| sample_beta(alpha, &mut rng)).collect();
            let m = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
            assert!((m - 0.5).abs() < 0.01, "α {alpha}: mean {m}");
            let want = 1.0 / (4.0 * (2.0 * alpha + 1.0));
            assert!(
                (var - want).abs() < 0.05 * want,
                "α {alpha}: var {var} vs {want}"
            );
            assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
        }
    }

    #[test]
    fn mixup_mixes_each_row_with_its_partner() {
        let mut x: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let orig = x.clone();
        let (l, perm) = mixup(&mut x, 2, 1.0, 5, 0, 0);
        for i in 0..4 {
            for k in 0..2 {
                let want = l as f32 * orig[2 * i + k] + (1.0 - l as f32) * orig[2 * perm[i] + k];
                assert!((x[2 * i + k] - want).abs() < 1e-6);
            }
        }
        let mut sorted = perm.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3]);
    }
}
