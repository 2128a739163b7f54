use super::*;
use crate::resample::nearest_source_index;
use approx::assert_relative_eq;

/// Naive reference: materialise resampled labels and loop in the obvious order.
fn naive(
    f: &[f64],
    labels: &[i64],
    g: &FeatureGeometry,
    a: &[f64],
    ignore: i64,
) -> (f64, std::vec::Vec<f64>) {
    let (b, d, h, w) = (g.batch, g.channels, g.height, g.width);
    let mut valid = 0usize;
    let mut sum = 0.0;
    let mut lab = std::vec![ignore; b * h * w];
    for bi in 0..b {
        for y in 0..h {
            for x in 0..w {
                let sy = nearest_source_index(g.label_height, h, y);
                let sx = nearest_source_index(g.label_width, w, x);
                lab[(bi * h + y) * w + x] = labels[(bi * g.label_height + sy) * g.label_width + sx];
            }
        }
    }
    for &l in &lab {
        if l != ignore {
            valid += 1;
        }
    }
    let mut grad = std::vec![0.0; f.len()];
    for bi in 0..b {
        for c in 0..d {
            for p in 0..h * w {
                let l = lab[bi * h * w + p];
                if l == ignore {
                    continue;
                }
                let i = (bi * d + c) * h * w + p;
                let diff = f[i] - a[l as usize * d + c];
                sum += diff * diff;
                grad[i] = 2.0 * diff / (valid * d) as f64;
            }
        }
    }
    (
        if valid == 0 {
            0.0
        } else {
            sum / (valid * d) as f64
        },
        grad,
    )
}

#[test]
fn matches_naive_with_resampling_across_tiles() {
    // 3000 pixels per image spans two tiles; labels at 3× resolution minus one column.
    let g = FeatureGeometry {
        batch: 2,
        channels: 3,
        height: 50,
        width: 60,
        label_height: 150,
        label_width: 179,
    };
    let mut rng = crate::rng::SeededRng::new(5);
    let f: std::vec::Vec<f64> = (0..g.feature_len().unwrap())
        .map(|_| rng.next_normal())
        .collect();
    let labels: std::vec::Vec<i64> = (0..g.label_len().unwrap())
        .map(|_| {
            let r = rng.next_u64() % 6;
            if r == 5 {
                255
            } else {
                r as i64
            }
        })
        .collect();
    let a: std::vec::Vec<f64> = (0..5 * 3).map(|_| rng.next_normal()).collect();
    let targets = P2aTargets {
        anchors: &a,
        classes: 5,
        ignore_index: 255,
        class_active: None,
    };
    let mut grad = std::vec![7.0; f.len()];
    let v = p2a_nchw(&f, &labels, &g, &targets, Some(&mut grad)).unwrap();
    let (want, want_grad) = naive(&f, &labels, &g, &a, 255);
    assert_relative_eq!(v.loss, want, max_relative = 1e-13);
    for (x, y) in grad.iter().zip(&want_grad) {
        assert_relative_eq!(*x, *y, max_relative = 1e-13);
    }
    // The same through the u32 path (C ≥ 255): add unused classes.
    let mut big = a.clone();
    big.resize(300 * 3, 0.5);
    let targets = P2aTargets {
        anchors: &big,
        classes: 300,
        ignore_index: 255,
        class_active: None,
    };
    let labels_big: std::vec::Vec<i64> = labels
        .iter()
        .map(|&l| if l == 255 { 299 } else { l })
        .collect();
    let targets_ign = P2aTargets {
        ignore_index: 299,
        ..targets
    };
    let v2 = p2a_nchw(&f, &labels_big, &g, &targets_ign, Some(&mut grad)).unwrap();
    assert_relative_eq!(v2.loss, want, max_relative = 1e-13);
    for (x, y) in grad.iter().zip(&want_grad) {
        assert_relative_eq!(*x, *y, max_relative = 1e-13);
    }
}

#[test]
fn label_errors_name_the_position() {
    let g = FeatureGeometry {
        batch: 1,
        channels: 1,
        height: 1,
        width: 2,
        label_height: 1,
        label_width: 2,
    };
    let targets = P2aTargets {
        anchors: &[0.0f32, 1.0],
        classes: 2,
        ignore_index: 255,
        class_active: None,
    };
    let e = p2a_nchw(&[0.0f32; 2], &[1i64, 2], &g, &targets, None).unwrap_err();
    assert_eq!(
        e,
        SarError::Label {
            op: Op::P2a,
            index: 1,
            label: 2,
            classes: 2
        }
    );
    let e = p2a_nchw(&[0.0f32; 2], &[-3i64, 0], &g, &targets, None).unwrap_err();
    assert!(matches!(e, SarError::Label { label: -3, .. }));
}

#[test]
fn empty_omega_is_zero_with_zero_grad_even_for_nan_features() {
    let g = FeatureGeometry {
        batch: 1,
        channels: 2,
        height: 1,
        width: 2,
        label_height: 1,
        label_width: 2,
    };
    let targets = P2aTargets {
        anchors: &[0.0f64, 1.0],
        classes: 1,
        ignore_index: 255,
        class_active: None,
    };
    let mut grad = [1.0; 4];
    let v = p2a_nchw(&[f64::NAN; 4], &[255u8, 255], &g, &targets, Some(&mut grad)).unwrap();
    assert_eq!(
        v,
        P2aValue {
            loss: 0.0,
            valid: 0
        }
    );
    assert_eq!(grad, [0.0; 4]);
    // NaN inside Ω is an error, not a silent NaN loss.
    let e = p2a_nchw(&[f64::NAN; 4], &[0u8, 255], &g, &targets, Some(&mut grad)).unwrap_err();
    assert!(matches!(e, SarError::NonFinite { .. }));
}

/// Fuzzing regression: a feature map with no pixels (W = 0) and an empty label map.
#[test]
fn empty_feature_map_with_empty_labels() {
    let g = FeatureGeometry {
        batch: 1,
        channels: 1,
        height: 2,
        width: 0,
        label_height: 0,
        label_width: 3,
    };
    let targets = P2aTargets {
        anchors: &[0.0f64],
        classes: 1,
        ignore_index: 255,
        class_active: None,
    };
    let v = p2a_nchw::<f64, i64>(&[], &[], &g, &targets, Some(&mut [])).unwrap();
    assert_eq!(
        v,
        P2aValue {
            loss: 0.0,
            valid: 0
        }
    );
    let g = FeatureGeometry {
        height: 0,
        width: 4,
        label_height: 3,
        label_width: 0,
        ..g
    };
    assert_eq!(
        p2a_nchw::<f64, i64>(&[], &[], &g, &targets, None)
            .unwrap()
            .valid,
        0
    );
}

#[test]
fn inactive_classes_leave_omega() {
    let g = FeatureGeometry {
        batch: 1,
        channels: 1,
        height: 1,
        width: 2,
        label_height: 1,
        label_width: 2,
    };
    let active = [true, false];
    let targets = P2aTargets {
        anchors: &[0.0f64, 5.0],
        classes: 2,
        ignore_index: 255,
        class_active: Some(&active),
    };
    let mut grad = [9.0; 2];
    let v = p2a_nchw(&[2.0, 1.0], &[0u8, 1], &g, &targets, Some(&mut grad)).unwrap();
    assert_eq!(
        v,
        P2aValue {
            loss: 4.0,
            valid: 1
        }
    );
    assert_eq!(grad, [4.0, 0.0]);
}

#[test]
fn rows_plain_and_ignore() {
    let targets = P2aTargets {
        anchors: &[1.0f32, 1.0, -1.0, 0.0],
        classes: 2,
        ignore_index: -100,
        class_active: None,
    };
    let mut grad = [9.0f32; 6];
    let v = p2a_rows(
        &[2.0, 3.0, 0.0, 0.0, 5.0, 5.0],
        RowLabels::Plain(&[0i32, 1, -100]),
        2,
        &targets,
        Some(&mut grad),
    )
    .unwrap();
    // Row 0: (1² + 2²) = 5, row 1: (1² + 0²) = 1; |Ω|·D = 4.
    assert_eq!(
        v,
        P2aValue {
            loss: 1.5,
            valid: 2
        }
    );
    assert_eq!(grad, [0.5, 1.0, 0.5, 0.0, 0.0, 0.0]);
}
