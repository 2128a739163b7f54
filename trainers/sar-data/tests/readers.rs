//! Every reader on small files written here in the exact official formats, and every class of
//! bad file: an error naming the file and the problem, never a panic.
use sar_data::cifar::{read_cifar10, read_cifar100, read_files, Cifar};
use sar_data::idx::{read, read_mnist_dir, read_pair};
use sar_data::split::{long_tailed, stratified};
use sar_data::{digits, DataError};
use std::io::Write;
use std::path::Path;

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    b
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn message(e: DataError) -> String {
    e.to_string()
}

#[test]
fn idx_plain_and_gzip_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let pixels: Vec<u8> = (0..3 * 2 * 4).map(|i| i as u8 * 7).collect();
    std::fs::write(
        dir.path().join("train-images-idx3-ubyte"),
        idx_bytes(&[3, 2, 4], &pixels),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("train-labels-idx1-ubyte.gz"),
        gz(&idx_bytes(&[3], &[9, 0, 4])),
    )
    .unwrap();
    let set = read_mnist_dir(dir.path(), true, 10).unwrap();
    assert_eq!(
        (set.len(), set.channels, set.height, set.width),
        (3, 1, 2, 4)
    );
    assert_eq!(set.labels, [9, 0, 4]);
    assert_eq!(set.image(1).unwrap(), &pixels[8..16]);
    assert_eq!(set.class_counts()[9], 1);
    // The test split is missing: the folder and the expected names are in the message.
    let e = message(read_mnist_dir(dir.path(), false, 10).unwrap_err());
    assert!(e.contains("t10k-images-idx3-ubyte"), "{e}");
}

#[test]
fn idx_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("magic", vec![1, 2, 8, 1, 0, 0, 0, 1, 5], "not an IDX file"),
        (
            "type",
            vec![0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0],
            "element type 0x0d",
        ),
        (
            "truncated",
            idx_bytes(&[2, 2, 2], &[1, 2, 3]),
            "truncated: dimensions [2, 2, 2] need 8 data bytes, found 3",
        ),
        (
            "trailing",
            idx_bytes(&[2], &[1, 2, 3]),
            "bytes follow the 2 data bytes",
        ),
        (
            "short_header",
            vec![0, 0, 8, 3, 0, 0],
            "file ends inside dimension 0",
        ),
        ("huge", idx_bytes(&[u32::MAX, u32::MAX, 16], &[]), "exceed"),
        (
            "gzip_truncated",
            gz(&idx_bytes(&[100], &[7; 100]))[..30].to_vec(),
            "cannot read",
        ),
        ("empty", vec![], "file ends inside the header"),
    ];
    for (name, bytes, want) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = message(read(&p).unwrap_err());
        assert!(
            e.contains(&p.display().to_string()) && e.contains(want),
            "{name}: {e}"
        );
    }
    // A label out of range, and counts that disagree, name the labels file.
    let (img, lab) = (dir.path().join("img"), dir.path().join("lab"));
    std::fs::write(&img, idx_bytes(&[2, 1, 1], &[0, 0])).unwrap();
    std::fs::write(&lab, idx_bytes(&[2], &[3, 10])).unwrap();
    let e = message(read_pair(&img, &lab, 10, "t").unwrap_err());
    assert!(e.contains("lab") && e.contains("label 10 of item 1"), "{e}");
    std::fs::write(&lab, idx_bytes(&[3], &[3, 1, 1])).unwrap();
    let e = message(read_pair(&img, &lab, 10, "t").unwrap_err());
    assert!(e.contains("holds 2 images"), "{e}");
    let e = message(read(&dir.path().join("missing")).unwrap_err());
    assert!(e.contains("missing"), "{e}");
}

fn cifar_record(labels: &[u8], fill: u8) -> Vec<u8> {
    let mut r = labels.to_vec();
    r.extend((0..3072).map(|i| fill.wrapping_add((i / 1024) as u8)));
    r
}

#[test]
fn cifar100_and_cifar10_files() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("cifar-100-binary");
    std::fs::create_dir(&sub).unwrap();
    let mut train = cifar_record(&[3, 77], 10);
    train.extend(cifar_record(&[19, 99], 20));
    std::fs::write(sub.join("train.bin"), &train).unwrap();
    let fine = read_cifar100(dir.path(), true, Cifar::HundredFine).unwrap();
    assert_eq!(
        (fine.len(), fine.classes, fine.labels.clone()),
        (2, 100, vec![77, 99])
    );
    // Planes are R, G, B: the first red, green and blue bytes of image 1.
    let im = fine.image(1).unwrap();
    assert_eq!((im[0], im[1024], im[2048]), (20, 21, 22));
    let coarse = read_cifar100(dir.path(), true, Cifar::HundredCoarse).unwrap();
    assert_eq!(coarse.labels, [3, 19]);
    // CIFAR-10: five training batches.
    for i in 1..=5 {
        std::fs::write(
            dir.path().join(format!("data_batch_{i}.bin")),
            cifar_record(&[i as u8], i as u8),
        )
        .unwrap();
    }
    let ten = read_cifar10(dir.path(), true).unwrap();
    assert_eq!(ten.labels, [1, 2, 3, 4, 5]);
    assert!(message(read_cifar10(dir.path(), false).unwrap_err()).contains("no CIFAR-10 batches"));
}

#[test]
fn cifar_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("train.bin");
    let mut bytes = cifar_record(&[1, 2], 0);
    bytes.extend_from_slice(&[5; 100]);
    std::fs::write(&p, &bytes).unwrap();
    let e = message(read_files(&[&p], Cifar::HundredFine, "t").unwrap_err());
    assert!(
        e.contains("train.bin") && e.contains("truncated: record 1 has 100 of 3074 bytes"),
        "{e}"
    );
    std::fs::write(&p, cifar_record(&[1, 100], 0)).unwrap();
    let e = message(read_files(&[&p], Cifar::HundredFine, "t").unwrap_err());
    assert!(
        e.contains("record 0: label 100 is not below 100 classes"),
        "{e}"
    );
    std::fs::write(&p, cifar_record(&[20, 1], 0)).unwrap();
    assert!(
        message(read_files(&[&p], Cifar::HundredCoarse, "t").unwrap_err()).contains("label 20")
    );
    assert!(
        message(read_files(&[Path::new("/nonexistent/x.bin")], Cifar::Ten, "t").unwrap_err())
            .contains("/nonexistent/x.bin")
    );
}

#[test]
fn embedded_digits() {
    let d = digits::embedded().unwrap();
    assert_eq!(
        (
            d.len(),
            d.channels,
            d.height,
            d.width,
            d.classes,
            d.max_value
        ),
        (1797, 1, 8, 8, 10, 16)
    );
    d.validate().unwrap();
    let counts = d.class_counts();
    assert_eq!(counts.iter().sum::<u64>(), 1797);
    assert!(
        counts.iter().all(|&n| (174..=183).contains(&n)),
        "{counts:?}"
    );
    assert!(d.images.iter().all(|&p| p <= 16));
    // First row of the CSV: label 0, pixels 0,0,5,13,9,1,0,0, …
    assert_eq!(d.labels[0], 0);
    assert_eq!(&d.image(0).unwrap()[..8], &[0, 0, 5, 13, 9, 1, 0, 0]);
    let e = message(digits::parse_csv(&b"1,2,3\n"[..], "x.csv").unwrap_err());
    assert!(e.contains("x.csv: line 1: 3 values"), "{e}");
    let mut line = vec!["0"; 64];
    line.push("12");
    let e = message(digits::parse_csv(line.join(",").as_bytes(), "x.csv").unwrap_err());
    assert!(e.contains("label 12 is above 9"), "{e}");
}

#[test]
fn long_tailed_and_stratified_splits() {
    // 100 classes × 500 items, the CIFAR-100 training shape: IF = 100 keeps 10,847.
    let labels: Vec<u32> = (0..50_000).map(|i| (i % 100) as u32).collect();
    let lt = long_tailed(&labels, 100, 100.0, Some(500), 7).unwrap();
    assert_eq!(lt.len(), 10_847);
    let mut counts = vec![0; 100];
    for &i in &lt {
        counts[labels[i] as usize] += 1;
    }
    assert_eq!((counts[0], counts[36], counts[99]), (500, 93, 5));
    // Same seed, same subset; another seed, another subset of the same sizes.
    assert_eq!(lt, long_tailed(&labels, 100, 100.0, Some(500), 7).unwrap());
    let other = long_tailed(&labels, 100, 100.0, Some(500), 8).unwrap();
    assert_eq!(other.len(), lt.len());
    assert_ne!(other, lt);
    assert!(long_tailed(&labels, 100, 100.0, Some(501), 7).is_err());
    assert!(long_tailed(&[0, 5], 3, 10.0, None, 7).is_err());
    // Stratified: every class split by the fraction, no overlap, nothing lost.
    let d = digits::embedded().unwrap();
    let (train, test) = stratified(&d.labels, 10, 1.0 / 3.0, 1).unwrap();
    assert_eq!(train.len() + test.len(), 1797);
    assert!(train.iter().all(|i| test.binary_search(i).is_err()));
    let sub = d.subset(&test, "digits/test").unwrap();
    assert!(
        sub.class_counts().iter().all(|&n| (58..=61).contains(&n)),
        "{:?}",
        sub.class_counts()
    );
}
