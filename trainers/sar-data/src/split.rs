//! Subsets drawn from a seed: long-tailed (the CIFAR-LT rule) and stratified splits.
//!
//! Shuffles are Fisher–Yates with `sar_math::rng::SeededRng` (xoshiro256\*\*, portable), so
//! a seed gives the same subset on every platform.

use crate::{DataError, Result};
use sar_math::rng::SeededRng;

fn shuffled_per_class(labels: &[u32], classes: usize, seed: u64) -> Result<Vec<Vec<usize>>> {
    let mut per_class = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        per_class
            .get_mut(l as usize)
            .ok_or_else(|| {
                DataError::Request(format!(
                    "label {l} of item {i} is not below {classes} classes"
                ))
            })?
            .push(i);
    }
    let mut rng = SeededRng::new(seed);
    for idx in &mut per_class {
        for i in (1..idx.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            idx.swap(i, j);
        }
    }
    Ok(per_class)
}

/// Indices of a long-tailed subset: class c keeps n_c = floor(n_max · IF^(−c/(C−1))) items
/// chosen by a seeded shuffle ([`sar_math::longtail::cifar_lt_counts`]). `n_max` defaults to the
/// smallest class's size. Indices are returned class by class, ascending within a class.
pub fn long_tailed(
    labels: &[u32],
    classes: usize,
    imbalance: f64,
    n_max: Option<u64>,
    seed: u64,
) -> Result<Vec<usize>> {
    let per_class = shuffled_per_class(labels, classes, seed)?;
    let smallest = per_class.iter().map(|v| v.len() as u64).min().unwrap_or(0);
    let n_max = n_max.unwrap_or(smallest);
    let mut counts = vec![0u64; classes];
    sar_math::longtail::cifar_lt_counts(n_max, imbalance, &mut counts)
        .map_err(|e| DataError::Request(e.to_string()))?;
    let mut out = Vec::new();
    for (c, (idx, &n)) in per_class.iter().zip(&counts).enumerate() {
        if n as usize > idx.len() {
            return Err(DataError::Request(format!(
                "class {c} has {} items; the long-tailed split asks for {n}",
                idx.len()
            )));
        }
        let mut keep = idx[..n as usize].to_vec();
        keep.sort_unstable();
        out.extend(keep);
    }
    Ok(out)
}

/// A stratified split: from each class, `round(len · test_fraction)` items (seeded shuffle) go to
/// the test side. Returns (train, test) indices, each ascending.
pub fn stratified(
    labels: &[u32],
    classes: usize,
    test_fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>)> {
    if !(0.0..=1.0).contains(&test_fraction) {
        return Err(DataError::Request(format!(
            "test fraction {test_fraction} is outside [0, 1]"
        )));
    }
    let per_class = shuffled_per_class(labels, classes, seed)?;
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for idx in per_class {
        let k = (idx.len() as f64 * test_fraction).round() as usize;
        test.extend_from_slice(&idx[..k]);
        train.extend_from_slice(&idx[k..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    Ok((train, test))
}
