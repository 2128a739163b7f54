//! The data readers on arbitrary bytes: IDX (plain or gzip), CIFAR-10/100 records, the digits
//! CSV and CUB-200's `id value` text files. The first byte picks the reader. Each returns a set or an error, never panics; a set
//! it returns is consistent (lengths, label range).
#![no_main]
use libfuzzer_sys::fuzz_target;
use sar_data::cifar::{parse_into, Cifar};
use sar_data::{digits, idx, ImageSet};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    match which % 6 {
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
            let kind = [Cifar::Ten, Cifar::HundredFine, Cifar::HundredCoarse][(which % 6 - 1) as usize];
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
