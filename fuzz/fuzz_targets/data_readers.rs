//! The data readers on arbitrary bytes: IDX (plain or gzip), CIFAR-10/100 records, the digits
//! CSV, CUB-200's `id value` text files, segmentation label-map PNGs (then mapped by every
//! data set's label map and pushed through the augmentation pipeline) and image files. The
//! first byte picks the reader. Each returns a set or an error, never panics; a set
//! it returns is consistent (lengths, label range).
#![no_main]
use libfuzzer_sys::fuzz_target;
use sar_data::cifar::{parse_into, Cifar};
use sar_data::{digits, idx, ImageSet};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    match which % 8 {
        6 => {
            if let Ok((h, w, v)) = sar_data::seg::decode_label_png(bytes, "fuzz.png") {
                assert_eq!(v.len(), h * w);
                for map in [
                    sar_data::seg::LabelMap::identity(19),
                    sar_data::seg::LabelMap::reduce_zero(150),
                    sar_data::seg::LabelMap::cityscapes_label_ids(),
                ] {
                    let _ = v.iter().map(|&x| map.get(x)).count();
                }
                if h * w <= 1 << 14 {
                    let s = sar_data::seg::SegSample {
                        height: h,
                        width: w,
                        image: vec![7; h * w * 3],
                        label: v.iter().map(|&x| x.min(18).max(if x == 255 { 255 } else { 0 })).collect(),
                    };
                    let aug = sar_data::seg_augment::SegAugment {
                        scale: (w.max(1), h.max(1)),
                        ratio_range: (0.5, 2.0),
                        crop: (1 + which as usize % 31, 1 + (bytes.len() % 29)),
                        cat_max_ratio: 0.75,
                        flip: true,
                        photometric: true,
                    };
                    let mut rng = sar_math::rng::SeededRng::new(bytes.len() as u64);
                    let (o, valid) = sar_data::seg_augment::augment(&s, &aug, &mut rng);
                    assert_eq!((o.height, o.width), aug.crop);
                    assert!(valid.0 <= o.height && valid.1 <= o.width);
                    assert_eq!(o.label.len(), o.height * o.width);
                }
            }
        }
        7 => {
            if let Ok((h, w, v)) = sar_data::seg::decode_image(bytes, "fuzz.img") {
                assert_eq!(v.len(), h * w * 3);
            }
        }
        5 => {
            if let Ok(text) = std::str::from_utf8(bytes) {
                if let Ok(pairs) = sar_data::cub::parse_pairs(text, "images.txt") {
                    assert!(pairs.len() <= text.lines().count());
                }
            }
        }
        0 => {
            if let Ok(a) = idx::parse(bytes, "fuzz.idx") {
                assert_eq!(a.data.len(), a.dims.iter().product::<usize>());
            }
        }
        1 | 2 | 3 => {
            let kind = [Cifar::Ten, Cifar::HundredFine, Cifar::HundredCoarse][(which % 8 - 1) as usize];
            let mut set = ImageSet { name: "fuzz".into(), channels: 3, height: 32, width: 32, classes: kind.classes(), max_value: 255, images: vec![], labels: vec![] };
            if parse_into(bytes, kind, "fuzz.bin", &mut set).is_ok() {
                set.validate().unwrap();
            }
        }
        _ => {
            if let Ok(set) = digits::parse_csv(bytes, "fuzz.csv") {
                set.validate().unwrap();
            }
        }
    }
});
