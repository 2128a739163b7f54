//! CUB-200-2011 on a small tree written by the test in the official layout, the file-backed
//! dataset's transforms, and bad trees.
use sar_data::cub::read_cub;
use sar_data::dataset::{center_crop, imagenet_normalize, random_resized_crop, Dataset};
use sar_math::rng::SeededRng;
use std::path::Path;

/// Writes `n` images (id i: class 1 + i % 3, train if i is even), sizes varying, each a solid
/// colour that encodes its class in the red channel.
pub fn write_cub(root: &Path, n: usize) {
    std::fs::create_dir_all(root.join("images")).unwrap();
    let (mut images, mut labels, mut split) = (String::new(), String::new(), String::new());
    for i in 1..=n {
        let class = 1 + i % 3;
        let dir = format!("{class:03}.Bird_{class}");
        std::fs::create_dir_all(root.join("images").join(&dir)).unwrap();
        let rel = format!("{dir}/img_{i}.jpg");
        let (w, h) = (40 + 7 * i as u32, 30 + 5 * i as u32);
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([60 * class as u8, 100, 20]));
        img.save(root.join("images").join(&rel)).unwrap();
        images += &format!("{i} {rel}\n");
        labels += &format!("{i} {class}\n");
        split += &format!("{i} {}\n", (i % 2 == 0) as u8);
    }
    std::fs::write(root.join("images.txt"), images).unwrap();
    std::fs::write(root.join("image_class_labels.txt"), labels).unwrap();
    std::fs::write(root.join("train_test_split.txt"), split).unwrap();
}

#[test]
fn reads_the_official_layout_and_renders_batches() {
    let dir = tempfile::tempdir().unwrap();
    write_cub(dir.path(), 9);
    let train = read_cub(dir.path(), true).unwrap();
    let test = read_cub(dir.path(), false).unwrap();
    assert_eq!((train.len(), test.len()), (4, 5));
    assert_eq!(train.classes, 200);
    // id 2 → class 3 → label 2; id 4 → class 2 → label 1.
    assert_eq!(train.labels, vec![2, 1, 0, 2]);
    let set = Dataset::Files {
        set: train,
        size: 16,
        resize: 20,
    };
    assert_eq!(set.geometry(), (3, 16, 16));
    let norm = imagenet_normalize();
    for augment in [None, Some(sar_data::augment::Augment::None)] {
        let (x, y) = set.render_batch(&[0, 3], augment, &norm, 1, 0, 0).unwrap();
        assert_eq!(x.len(), 2 * 3 * 16 * 16);
        assert_eq!(y, vec![2, 2]);
        // Solid images stay solid through crop, resize and flip: red channel = 180/255.
        let want = (180.0 / 255.0 - 0.485) / 0.229;
        assert!(x[..256].iter().all(|v| (v - want).abs() < 0.02), "{}", x[0]);
    }
    let (x1, _) = set
        .render_batch(&[1], Some(sar_data::augment::Augment::None), &norm, 5, 2, 7)
        .unwrap();
    let (x2, _) = set
        .render_batch(&[1], Some(sar_data::augment::Augment::None), &norm, 5, 2, 7)
        .unwrap();
    assert_eq!(x1, x2, "rendering is a function of (seed, epoch, position)");
}

#[test]
fn crops_have_the_requested_geometry() {
    // A left-to-right ramp: the centre crop keeps the middle, random crops stay inside.
    let img = image::RgbImage::from_fn(300, 200, |x, _| image::Rgb([(x * 255 / 299) as u8, 0, 0]));
    let c = center_crop(&img, 100, 80);
    assert_eq!((c.width(), c.height()), (80, 80));
    let mid = c.get_pixel(40, 40)[0] as i32;
    assert!((mid - 128).abs() < 6, "centre pixel {mid}");
    let mut rng = SeededRng::new(4);
    for _ in 0..50 {
        let r = random_resized_crop(&img, 32, &mut rng);
        assert_eq!((r.width(), r.height()), (32, 32));
    }
}

#[test]
fn bad_trees_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = read_cub(dir.path(), true).unwrap_err().to_string();
    assert!(e.contains("images.txt"), "{e}");
    for (file, content, want) in [
        ("image_class_labels.txt", "1 2\n2 201\n3 1\n", "class `201`"),
        ("train_test_split.txt", "1 0\n2 2\n3 1\n", "split `2`"),
        ("image_class_labels.txt", "1 2\n3 1\n", "id 2 has no label"),
        (
            "images.txt",
            "1 001.Bird_1/img_1.jpg\nx 002.y/z.jpg\n",
            "not a number",
        ),
    ] {
        let d = tempfile::tempdir().unwrap();
        write_cub(d.path(), 3);
        std::fs::write(d.path().join(file), content).unwrap();
        let e = read_cub(d.path(), true).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains(file), "{file}: {e}");
    }
    // A listed image that is missing, and one that is not a JPEG.
    let d = tempfile::tempdir().unwrap();
    write_cub(d.path(), 4);
    std::fs::remove_file(d.path().join("images/003.Bird_3/img_2.jpg")).unwrap();
    let e = read_cub(d.path(), true).unwrap_err().to_string();
    assert!(e.contains("img_2.jpg") && e.contains("missing"), "{e}");
    let d = tempfile::tempdir().unwrap();
    write_cub(d.path(), 4);
    std::fs::write(
        d.path().join("images/002.Bird_2/img_4.jpg"),
        b"\xff\xd8\xff garbage",
    )
    .unwrap();
    let set = Dataset::Files {
        set: read_cub(d.path(), true).unwrap(),
        size: 8,
        resize: 8,
    };
    let e = set
        .render_batch(&[0, 1], None, &imagenet_normalize(), 0, 0, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("img_4.jpg") && e.contains("decode"), "{e}");
}
