//! Segmentation readers on small trees written here in the official layouts, label
//! mappings, bad input, the glyph mosaic, and the augmentation pipeline's pixel–label
//! alignment.

use sar_data::seg::{self, LabelMap, SegDataset, SegSample, SegSource, IGNORE};
use sar_data::seg_augment::{self, SegAugment};
use sar_math::rng::SeededRng;
use std::path::Path;

fn write_rgb(path: &Path, h: u32, w: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 * 10, y as u8 * 10, 77]));
    img.save(path).unwrap();
}

fn write_gray(path: &Path, h: u32, w: u32, values: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_raw(w, h, values.to_vec())
        .unwrap()
        .save(path)
        .unwrap();
}

fn write_palette(path: &Path, h: u32, w: u32, values: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(f, w, h);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(
        (0..256 * 3)
            .map(|i| (i * 7 % 256) as u8)
            .collect::<Vec<_>>(),
    );
    enc.write_header()
        .unwrap()
        .write_image_data(values)
        .unwrap();
}

fn err(r: sar_data::Result<SegSample>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn cityscapes_label_ids_are_mapped_to_train_ids() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Every labelId once (0..=33) plus a repeat: 34 values in a 2×17 map.
    let ids: Vec<u8> = (0..34).collect();
    for (city, stem) in [
        ("aachen", "aachen_000000_000019"),
        ("bremen", "bremen_000001_000019"),
    ] {
        write_rgb(
            &root.join(format!("leftImg8bit/train/{city}/{stem}_leftImg8bit.png")),
            2,
            17,
        );
        write_gray(
            &root.join(format!("gtFine/train/{city}/{stem}_gtFine_labelIds.png")),
            2,
            17,
            &ids,
        );
    }
    let ds = seg::cityscapes(root, true).unwrap();
    assert_eq!((ds.len(), ds.classes()), (2, 19));
    let s = ds.get(1).unwrap();
    assert_eq!((s.height, s.width), (2, 17));
    // road 7 → 0, sidewalk 8 → 1, building 11 → 2, car 26 → 13, bicycle 33 → 18; the rest 255.
    let want: Vec<u8> = vec![
        255, 255, 255, 255, 255, 255, 255, 0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8,
        9, 10, 11, 12, 13, 14, 15, 255, 255, 16, 17, 18,
    ];
    assert_eq!(s.label, want);
    assert_eq!(&s.image[..6], &[0, 0, 77, 10, 0, 77]);
    // Pixel counts: each train id once per image.
    let counts = ds.class_pixel_counts().unwrap();
    assert_eq!(counts, vec![2u64; 19]);
    // An unknown labelId is an error naming file, value and pixel.
    let bad = root.join("gtFine/train/bremen/bremen_000001_000019_gtFine_labelIds.png");
    let mut v = ids.clone();
    v[20] = 40;
    write_gray(&bad, 2, 17, &v);
    let e = err(ds.get(1));
    assert!(
        e.contains("bremen_000001_000019_gtFine_labelIds.png")
            && e.contains("unknown label value 40")
            && e.contains("row 1, column 3"),
        "{e}"
    );
}

#[test]
fn cityscapes_train_ids_and_bad_trees() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let stem = "zurich_000000_000019";
    write_rgb(
        &root.join(format!("leftImg8bit/val/zurich/{stem}_leftImg8bit.png")),
        3,
        4,
    );
    let lbl = root.join(format!("gtFine/val/zurich/{stem}_gtFine_labelTrainIds.png"));
    write_gray(&lbl, 3, 4, &[0, 1, 18, 255, 5, 5, 5, 5, 7, 7, 7, 255]);
    let ds = seg::cityscapes(root, false).unwrap();
    assert_eq!(ds.get(0).unwrap().label[..4], [0, 1, 18, 255]);
    // 19 is not a trainId.
    write_gray(&lbl, 3, 4, &[19; 12]);
    assert!(err(ds.get(0)).contains("unknown label value 19"));
    // A label map of another size names both files.
    write_gray(&lbl, 4, 3, &[0; 12]);
    let e = err(ds.get(0));
    assert!(
        e.contains("labelTrainIds.png") && e.contains("3×4") && e.contains("leftImg8bit.png"),
        "{e}"
    );
    // A corrupt PNG (truncated) names the file.
    let bytes =
        std::fs::read(root.join(format!("leftImg8bit/val/zurich/{stem}_leftImg8bit.png"))).unwrap();
    write_gray(&lbl, 3, 4, &[0; 12]);
    let good = std::fs::read(&lbl).unwrap();
    std::fs::write(&lbl, &good[..good.len() - 20]).unwrap();
    let e = err(ds.get(0));
    assert!(e.contains("labelTrainIds.png"), "{e}");
    std::fs::write(&lbl, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    assert!(err(ds.get(0)).contains("labelTrainIds.png"));
    // An RGB label map is refused (colour-coded maps are not label maps).
    std::fs::write(&lbl, &bytes).unwrap();
    let e = err(ds.get(0));
    assert!(e.contains("8-bit grayscale or palette"), "{e}");
    // A missing label map fails the listing, naming the image.
    std::fs::remove_file(&lbl).unwrap();
    let e = seg::cityscapes(root, false).unwrap_err().to_string();
    assert!(
        e.contains("zurich_000000_000019_leftImg8bit.png") && e.contains("no label map"),
        "{e}"
    );
    // An empty split.
    assert!(seg::cityscapes(root, true).is_err());
}

#[test]
fn ade20k_reduces_zero_label() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for id in ["ADE_train_00000001", "ADE_train_00000002"] {
        write_rgb(&root.join(format!("images/training/{id}.jpg")), 2, 3);
        write_gray(
            &root.join(format!("annotations/training/{id}.png")),
            2,
            3,
            &[0, 1, 2, 150, 149, 255],
        );
    }
    let ds = seg::ade20k(root, true).unwrap();
    assert_eq!((ds.len(), ds.classes()), (2, 150));
    assert_eq!(ds.class_names[0], "wall");
    assert_eq!(ds.class_names[149], "flag");
    assert_eq!(
        ds.get(0).unwrap().label,
        vec![IGNORE, 0, 1, 149, 148, IGNORE]
    );
    write_gray(
        &root.join("annotations/training/ADE_train_00000002.png"),
        2,
        3,
        &[151; 6],
    );
    assert!(err(ds.get(1)).contains("unknown label value 151"));
    std::fs::remove_file(root.join("annotations/training/ADE_train_00000001.png")).unwrap();
    let e = seg::ade20k(root, true).unwrap_err().to_string();
    assert!(e.contains("ADE_train_00000001.jpg"), "{e}");
}

#[test]
fn pascal_context_reads_the_split_list_and_palette_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_rgb(&root.join("JPEGImages/2008_000002.jpg"), 2, 2);
    write_palette(
        &root.join("SegmentationClassContext/2008_000002.png"),
        2,
        2,
        &[0, 1, 59, 30],
    );
    std::fs::create_dir_all(root.join("ImageSets/SegmentationContext")).unwrap();
    std::fs::write(
        root.join("ImageSets/SegmentationContext/val.txt"),
        "2008_000002\n\n",
    )
    .unwrap();
    let ds = seg::pascal_context59(root, false).unwrap();
    assert_eq!(ds.classes(), 59);
    assert_eq!(ds.get(0).unwrap().label, vec![IGNORE, 0, 58, 29]);
    write_palette(
        &root.join("SegmentationClassContext/2008_000002.png"),
        2,
        2,
        &[60, 1, 1, 1],
    );
    assert!(err(ds.get(0)).contains("unknown label value 60"));
    std::fs::write(
        root.join("ImageSets/SegmentationContext/val.txt"),
        "2008_000002\n2008_000003\n",
    )
    .unwrap();
    let e = seg::pascal_context59(root, false).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("2008_000003.jpg"), "{e}");
    std::fs::write(root.join("ImageSets/SegmentationContext/val.txt"), "../x\n").unwrap();
    assert!(seg::pascal_context59(root, false).is_err());
}

#[test]
fn label_maps() {
    let m = LabelMap::reduce_zero(3);
    assert_eq!(
        (m.get(0), m.get(1), m.get(3), m.get(4), m.get(255)),
        (Some(255), Some(0), Some(2), None, Some(255))
    );
    let m = LabelMap::identity(2);
    assert_eq!((m.get(1), m.get(2), m.get(255)), (Some(1), None, Some(255)));
    let m = LabelMap::cityscapes_label_ids();
    assert_eq!(
        (m.get(7), m.get(24), m.get(34), m.get(255)),
        (Some(0), Some(11), None, None)
    );
    // In-memory samples are checked too.
    let ds = SegDataset {
        name: "mem".into(),
        class_names: vec!["a".into(), "b".into()],
        source: SegSource::Memory(vec![SegSample {
            height: 1,
            width: 2,
            image: vec![0; 6],
            label: vec![1, 2],
        }]),
    };
    assert!(err(ds.get(0)).contains("label 2 at row 0, column 1"));
}

fn mosaic() -> SegDataset {
    let digits = sar_data::digits::embedded().unwrap();
    seg::glyph_mosaic(
        &digits,
        &seg::MosaicConfig {
            size: 48,
            count: 300,
            glyphs: 4,
            imbalance: 20.0,
            seed: 3,
        },
        "mosaic",
    )
    .unwrap()
}

#[test]
fn glyph_mosaic_is_long_tailed_and_reproducible() {
    let ds = mosaic();
    assert_eq!((ds.len(), ds.classes()), (300, 11));
    let counts = ds.class_pixel_counts().unwrap();
    assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
    // Background dominates, digit 0 (class 1) is far more common than digit 9 (class 10).
    assert!(counts[0] > counts[1]);
    assert!(counts[1] > 8 * counts[10], "{counts:?}");
    assert!(
        counts[1..].windows(3).all(|w| w[0] > w[2]),
        "roughly decreasing: {counts:?}"
    );
    assert_eq!(mosaic().get(17).unwrap(), ds.get(17).unwrap());
}

/// The pipeline moves every pixel with its label: on a canvas whose colour encodes the label
/// in 8×8 blocks, the decoded colour of each output pixel must match its label (interior
/// pixels; block borders blend under bilinear resizing). A flipped or shifted label map would
/// fail at about half of the pixels.
#[test]
fn augmentation_keeps_labels_aligned_with_pixels() {
    let (h, w) = (64usize, 96usize);
    let block = |y: usize, x: usize| ((y / 8) * 3 + (x / 8) * 5) % 9;
    let mut s = SegSample {
        height: h,
        width: w,
        image: vec![0; h * w * 3],
        label: vec![0; h * w],
    };
    for y in 0..h {
        for x in 0..w {
            let l = block(y, x) as u8;
            s.label[y * w + x] = l;
            s.image[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&[
                l * 28,
                255 - l * 28,
                100,
            ]);
        }
    }
    let aug = SegAugment {
        scale: (96, 64),
        ratio_range: (0.5, 2.0),
        crop: (48, 48),
        cat_max_ratio: 0.75,
        flip: true,
        photometric: false,
    };
    let (mut checked, mut wrong, mut flips) = (0usize, 0usize, 0usize);
    for seed in 0..40 {
        let mut rng = SeededRng::new(seed);
        let (o, valid) = seg_augment::augment(&s, &aug, &mut rng);
        assert_eq!((o.height, o.width), (48, 48));
        for y in 0..48 {
            for x in 0..48 {
                let l = o.label[y * 48 + x];
                if y >= valid.0 || x >= valid.1 {
                    assert_eq!(l, IGNORE, "padding is ignored");
                    continue;
                }
                // Interior pixels only: bilinear resizing blends colours across block edges.
                let interior = (y.saturating_sub(2)..(y + 3).min(valid.0)).all(|yy| {
                    (x.saturating_sub(2)..(x + 3).min(valid.1)).all(|xx| o.label[yy * 48 + xx] == l)
                });
                if interior {
                    let decoded = ((o.image[(y * 48 + x) * 3] as f64) / 28.0).round() as u8;
                    checked += 1;
                    wrong += (decoded != l) as usize;
                }
            }
        }
        // Count flips by comparing with the unflipped draw of the same seed.
        let mut rng = SeededRng::new(seed);
        let (o2, _) = seg_augment::augment(&s, &SegAugment { flip: false, ..aug }, &mut rng);
        flips += (o2.label != o.label) as usize;
    }
    assert!(checked > 20_000, "{checked}");
    assert!(
        (wrong as f64) < 0.02 * checked as f64,
        "{wrong} of {checked} pixels disagree with their labels"
    );
    assert!((8..=32).contains(&flips), "flip rate {flips}/40");
    // The same image with its label map mirrored is caught.
    let mut t = s.clone();
    for y in 0..h {
        t.label[y * w..(y + 1) * w].reverse();
    }
    let mut mismatched = 0;
    for p in 0..h * w {
        mismatched += (((t.image[p * 3] as f64) / 28.0).round() as u8 != t.label[p]) as usize;
    }
    assert!(mismatched > h * w / 2);
}

#[test]
fn crop_respects_cat_max_ratio_when_it_can() {
    // Class 0 everywhere except a 24×24 patch of class 1: most 32×32 crops are all class 0,
    // and a crop passes the rule only where it overlaps the patch by more than 256 pixels.
    let (h, w) = (128usize, 128usize);
    let mut s = SegSample {
        height: h,
        width: w,
        image: vec![128; h * w * 3],
        label: vec![0; h * w],
    };
    for y in 52..76 {
        for x in 52..76 {
            s.label[y * w + x] = 1;
        }
    }
    let aug = SegAugment {
        scale: (128, 128),
        ratio_range: (1.0, 1.0),
        crop: (32, 32),
        cat_max_ratio: 0.75,
        flip: false,
        photometric: false,
    };
    let plain = SegAugment {
        cat_max_ratio: 1.0,
        ..aug
    };
    let mixed = |a: &SegAugment| {
        (0..200u64)
            .filter(|&seed| {
                let (o, _) = seg_augment::augment(&s, a, &mut SeededRng::new(seed));
                o.label.contains(&1)
            })
            .count()
    };
    let (with, without) = (mixed(&aug), mixed(&plain));
    assert!(
        with > 2 * without,
        "crops showing the rare class: {with} with the ratio rule, {without} without"
    );
}

#[test]
fn rescale_size_and_hsv() {
    assert_eq!(
        seg_augment::rescale_size(1024, 2048, (2048.0, 1024.0)),
        (1024, 2048)
    );
    assert_eq!(
        seg_augment::rescale_size(1024, 2048, (1024.0, 512.0)),
        (512, 1024)
    );
    // ADE-like 512×683 into (2048, 512)·1: f = min(2048/683, 512/512) = 1.
    assert_eq!(
        seg_augment::rescale_size(512, 683, (2048.0, 512.0)),
        (512, 683)
    );
    assert_eq!(seg_augment::rgb_to_hsv(255, 0, 0), (0, 255, 255));
    assert_eq!(seg_augment::rgb_to_hsv(0, 255, 0), (60, 255, 255));
    assert_eq!(seg_augment::rgb_to_hsv(0, 0, 255), (120, 255, 255));
    let mut rng = SeededRng::new(5);
    for _ in 0..2000 {
        let c: [u8; 3] = std::array::from_fn(|_| (rng.next_u64() % 256) as u8);
        let (h, s, v) = seg_augment::rgb_to_hsv(c[0], c[1], c[2]);
        let back = seg_augment::hsv_to_rgb(h, s, v);
        for (a, b) in [c[0], c[1], c[2]].iter().zip([back.0, back.1, back.2]) {
            assert!(
                (*a as i32 - b as i32).abs() <= 6,
                "{c:?} → {:?} → {back:?}",
                (h, s, v)
            );
        }
    }
}
