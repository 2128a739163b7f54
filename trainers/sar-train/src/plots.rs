//! PNG plots of a run: loss curves, per-class accuracy (baseline against SAR), and a 2-D
//! projection of features with the semantic anchors (as in the paper's Fig. 1/3).
//!
//! Drawn with plotters into memory, encoded as PNG and written atomically. Text uses the
//! embedded DejaVu Sans Mono (Bitstream Vera licence, `assets/DejaVu-LICENSE.txt`), so no system
//! font is needed.

use anyhow::Context;
use plotters::prelude::*;
use std::path::Path;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const SIZE: (u32, u32) = (900, 540);

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is a constant of the binary: failure would be a build defect.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn write_png(path: &Path, rgb: &[u8], (w, h): (u32, u32)) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(rgb)?;
    }
    crate::tensorio::write_atomic(path, &bytes)
        .with_context(|| format!("writing plot {}", path.display()))
}

fn draw(
    path: &Path,
    f: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    register_font();
    let mut buf = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        f(&root)?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    write_png(path, &buf, SIZE)
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e}")
}

/// Bar labels `"c (n)"`: class index and its training images (segmentation: pixels).
pub fn class_labels(train_counts: &[u64]) -> Vec<String> {
    train_counts
        .iter()
        .enumerate()
        .map(|(c, n)| format!("{c} ({n})"))
        .collect()
}

/// Named curves: `(name, [(x, y)])`.
pub type Series = Vec<(String, Vec<(f64, f64)>)>;

/// A colour per series or class.
pub fn palette(i: usize) -> RGBColor {
    const C: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    C[i % C.len()]
}

/// Curves `(name, [(x, y)])` on one chart.
pub fn curves(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let pts = series.iter().flat_map(|s| s.1.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts.filter(|p| p.0.is_finite() && p.1.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    draw(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1.max(x0 + 1e-9), (y0 - pad)..(y1 + pad))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        for (i, (name, s)) in series.iter().enumerate() {
            let color = palette(i);
            chart
                .draw_series(LineSeries::new(
                    s.iter().copied().filter(|p| p.1.is_finite()),
                    color.stroke_width(2),
                ))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        Ok(())
    })
}

/// A reliability diagram: per confidence bin, the accuracy of its predictions (bars) against
/// the diagonal of perfect calibration, with the bin's mean confidence marked and its sample
/// count in the x labels; ECE and MCE in the title.
pub fn reliability(
    path: &Path,
    title: &str,
    calibration: &crate::evaluation::Calibration,
) -> anyhow::Result<()> {
    let bins = &calibration.bins;
    let b = bins.len().max(1) as f64;
    let title = format!(
        "{title} (ECE {:.2}%, MCE {:.2}%)",
        100.0 * calibration.ece,
        100.0 * calibration.mce
    );
    draw(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(&title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("confidence (predicted class's softmax probability)")
            .y_desc("accuracy")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        let blue = palette(0);
        let red = palette(1);
        chart
            .draw_series(
                bins.iter()
                    .enumerate()
                    .filter(|(_, c)| c.count > 0)
                    .map(|(i, c)| {
                        let x = i as f64 / b;
                        Rectangle::new(
                            [(x + 0.004, 0.0), (x + 1.0 / b - 0.004, c.accuracy())],
                            blue.mix(0.8).filled(),
                        )
                    }),
            )
            .map_err(err)?
            .label("accuracy per bin")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], blue.filled()));
        chart
            .draw_series(
                bins.iter()
                    .filter(|c| c.count > 0)
                    .map(|c| Circle::new((c.confidence(), c.accuracy()), 4, red.filled())),
            )
            .map_err(err)?
            .label("(mean confidence, accuracy)")
            .legend(move |(x, y)| Circle::new((x + 7, y), 4, red.filled()));
        chart
            .draw_series(LineSeries::new(
                vec![(0.0, 0.0), (1.0, 1.0)],
                BLACK.stroke_width(1),
            ))
            .map_err(err)?
            .label("perfect calibration")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(1)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        Ok(())
    })
}

/// Grouped bars: per class, one bar per series (e.g. baseline and SAR accuracy in %).
pub fn grouped_bars(
    path: &Path,
    title: &str,
    y_desc: &str,
    class_labels: &[String],
    series: &[(String, Vec<f64>)],
) -> anyhow::Result<()> {
    let c = class_labels.len();
    let k = series.len().max(1) as f64;
    draw(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..(c as f64 - 0.5), 0f64..100f64)
            .map_err(err)?;
        let labels = class_labels.to_vec();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(c.min(50))
            .x_label_formatter(&move |x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                    labels[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .x_desc("class (training images or pixels)")
            .y_desc(y_desc)
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(err)?;
        for (j, (name, v)) in series.iter().enumerate() {
            let color = palette(j);
            let w = 0.8 / k;
            chart
                .draw_series(v.iter().enumerate().map(|(i, &a)| {
                    let x = i as f64 - 0.4 + j as f64 * w;
                    Rectangle::new(
                        [(x, 0.0), (x + w * 0.92, a.clamp(0.0, 100.0))],
                        color.filled(),
                    )
                }))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        Ok(())
    })
}

/// The top two principal directions of `rows` (`n × d`, row-major), by power iteration with
/// deflation on the covariance, and the mean.
pub fn principal_axes(rows: &[f32], d: usize) -> (Vec<f64>, [Vec<f64>; 2]) {
    let n = rows.len() / d.max(1);
    let mut mean = vec![0.0f64; d];
    for r in rows.chunks_exact(d) {
        for (m, &v) in mean.iter_mut().zip(r) {
            *m += v as f64 / n.max(1) as f64;
        }
    }
    let mut cov = vec![0.0f64; d * d];
    for r in rows.chunks_exact(d) {
        for i in 0..d {
            let a = r[i] as f64 - mean[i];
            for j in 0..d {
                cov[i * d + j] += a * (r[j] as f64 - mean[j]);
            }
        }
    }
    let mut axes: [Vec<f64>; 2] = [vec![0.0; d], vec![0.0; d]];
    for k in 0..2 {
        let mut v: Vec<f64> = (0..d)
            .map(|i| 1.0 + ((i * 7919 + k * 104729) % 97) as f64 / 97.0)
            .collect();
        for _ in 0..200 {
            let mut w = vec![0.0; d];
            for i in 0..d {
                w[i] = (0..d).map(|j| cov[i * d + j] * v[j]).sum();
            }
            if k == 1 {
                let dot: f64 = w.iter().zip(&axes[0]).map(|(a, b)| a * b).sum();
                for (x, a) in w.iter_mut().zip(&axes[0]) {
                    *x -= dot * a;
                }
            }
            let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm < 1e-30 {
                break;
            }
            v = w.iter().map(|x| x / norm).collect();
        }
        axes[k] = v;
    }
    (mean, axes)
}

/// Features (`n × d`, with labels) and anchors (`c × d`) projected on the features' top two
/// principal directions: points coloured by class, anchors as large ringed markers.
pub fn feature_projection(
    path: &Path,
    title: &str,
    features: &[f32],
    labels: &[u32],
    d: usize,
    anchors: Option<&[f32]>,
) -> anyhow::Result<()> {
    let (mean, axes) = principal_axes(features, d);
    let project = |r: &[f32]| -> (f64, f64) {
        let p = |a: &[f64]| {
            r.iter()
                .zip(&mean)
                .zip(a)
                .map(|((&v, m), a)| (v as f64 - m) * a)
                .sum::<f64>()
        };
        (p(&axes[0]), p(&axes[1]))
    };
    let pts: Vec<(f64, f64, u32)> = features
        .chunks_exact(d)
        .zip(labels)
        .map(|(r, &y)| {
            let (a, b) = project(r);
            (a, b, y)
        })
        .collect();
    let anchor_pts: Vec<(f64, f64)> = anchors
        .map(|a| a.chunks_exact(d).map(project).collect())
        .unwrap_or_default();
    let all = pts
        .iter()
        .map(|p| (p.0, p.1))
        .chain(anchor_pts.iter().copied());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in all.filter(|p| p.0.is_finite() && p.1.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (-1.0, 1.0, -1.0, 1.0);
    }
    let (px, py) = (((x1 - x0) * 0.05).max(1e-6), ((y1 - y0) * 0.05).max(1e-6));
    draw(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d((x0 - px)..(x1 + px), (y0 - py)..(y1 + py))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("PC 1")
            .y_desc("PC 2")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(
                pts.iter().map(|&(x, y, c)| {
                    Circle::new((x, y), 2, palette(c as usize).mix(0.6).filled())
                }),
            )
            .map_err(err)?;
        chart
            .draw_series(
                anchor_pts
                    .iter()
                    .enumerate()
                    .map(|(c, &(x, y))| Circle::new((x, y), 8, palette(c).filled())),
            )
            .map_err(err)?;
        chart
            .draw_series(
                anchor_pts
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 8, BLACK.stroke_width(2))),
            )
            .map_err(err)?;
        chart
            .draw_series(
                anchor_pts
                    .iter()
                    .enumerate()
                    .map(|(c, &(x, y))| Text::new(format!("{c}"), (x, y), ("sans-serif", 13))),
            )
            .map_err(err)?;
        Ok(())
    })
}

/// Colour of class `c` of `classes` in prediction images: Cityscapes' official palette for
/// 19 classes, otherwise evenly spaced hues; the ignore label is black.
pub fn class_colour(c: u8, classes: usize) -> [u8; 3] {
    const CITYSCAPES: [[u8; 3]; 19] = [
        [128, 64, 128],
        [244, 35, 232],
        [70, 70, 70],
        [102, 102, 156],
        [190, 153, 153],
        [153, 153, 153],
        [250, 170, 30],
        [220, 220, 0],
        [107, 142, 35],
        [152, 251, 152],
        [70, 130, 180],
        [220, 20, 60],
        [255, 0, 0],
        [0, 0, 142],
        [0, 0, 70],
        [0, 60, 100],
        [0, 80, 100],
        [0, 0, 230],
        [119, 11, 32],
    ];
    if c == sar_data::seg::IGNORE {
        return [0, 0, 0];
    }
    if classes == 19 {
        return CITYSCAPES[c as usize % 19];
    }
    if c == 0 {
        return [60, 60, 60];
    }
    // Hue by golden-ratio steps, full saturation.
    let h = (c as f64 * 0.618_033_988_75).fract() * 6.0;
    let x = (1.0 - ((h % 2.0) - 1.0).abs()) * 255.0;
    let (r, g, b) = match h as u32 {
        0 => (255.0, x, 0.0),
        1 => (x, 255.0, 0.0),
        2 => (0.0, 255.0, x),
        3 => (0.0, x, 255.0),
        4 => (x, 0.0, 255.0),
        _ => (255.0, 0.0, x),
    };
    [r as u8, g as u8, b as u8]
}

/// `predictions.png`: one row per sample, image | ground truth | prediction, colour-coded
/// with [`class_colour`], small images enlarged to at least 128 pixels high.
pub fn segmentation_panel(
    path: &Path,
    rows: &[(sar_data::seg::SegSample, Vec<u8>)],
    classes: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(!rows.is_empty(), "no samples to draw");
    let zoom = rows
        .iter()
        .map(|(s, _)| 128usize.div_ceil(s.height.max(1)))
        .max()
        .unwrap_or(1)
        .clamp(1, 8);
    let width = rows.iter().map(|(s, _)| s.width).max().unwrap_or(1) * zoom;
    let gap = 4;
    let (w, h) = (
        3 * width + 2 * gap,
        rows.iter()
            .map(|(s, _)| s.height * zoom + gap)
            .sum::<usize>(),
    );
    let mut img = vec![255u8; w * h * 3];
    let mut top = 0;
    for (s, pred) in rows {
        anyhow::ensure!(
            pred.len() == s.height * s.width,
            "prediction size differs from its image"
        );
        for y in 0..s.height * zoom {
            for x in 0..s.width * zoom {
                let p = (y / zoom) * s.width + x / zoom;
                let cols = [
                    [s.image[p * 3], s.image[p * 3 + 1], s.image[p * 3 + 2]],
                    class_colour(s.label[p], classes),
                    class_colour(pred[p], classes),
                ];
                for (panel, c) in cols.iter().enumerate() {
                    let o = ((top + y) * w + panel * (width + gap) + x) * 3;
                    img[o..o + 3].copy_from_slice(c);
                }
            }
        }
        top += s.height * zoom + gap;
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()
        .and_then(|mut wr| wr.write_image_data(&img))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principal_axes_find_the_spread_directions() {
        // Points along (1, 1, 0) with a smaller spread along (0, 0, 1).
        let mut rows = Vec::new();
        for i in -20..=20 {
            let t = i as f32;
            rows.extend([t, t, 0.1 * ((i % 3) as f32)]);
        }
        let (_, axes) = principal_axes(&rows, 3);
        let s = 1.0 / 2f64.sqrt();
        assert!((axes[0][0].abs() - s).abs() < 1e-3 && (axes[0][1].abs() - s).abs() < 1e-3);
        assert!(axes[1][2].abs() > 0.99, "{:?}", axes[1]);
    }

    #[test]
    fn plots_are_valid_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.png");
        curves(
            &p,
            "loss",
            "step",
            "loss",
            &[("a".into(), vec![(0.0, 1.0), (1.0, 0.5)])],
        )
        .unwrap();
        let b = dir.path().join("b.png");
        grouped_bars(
            &b,
            "acc",
            "%",
            &["0".into(), "1".into()],
            &[
                ("x".into(), vec![50.0, 70.0]),
                ("y".into(), vec![60.0, 20.0]),
            ],
        )
        .unwrap();
        let f = dir.path().join("f.png");
        let feats: Vec<f32> = (0..60).map(|i| (i as f32 * 0.37).sin()).collect();
        feature_projection(
            &f,
            "features",
            &feats,
            &[0, 1, 2, 0, 1, 2, 0, 1, 2, 0],
            6,
            Some(&feats[..18]),
        )
        .unwrap();
        for path in [p, b, f] {
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
            let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
            let reader = decoder.read_info().unwrap();
            assert_eq!((reader.info().width, reader.info().height), SIZE);
        }
    }
}
