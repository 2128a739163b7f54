//! `include/sar.h` must be what cbindgen generates from the current source: this test
//! regenerates it in memory and fails on any difference (CI runs it with the workspace tests).
//! `SAR_BLESS_HEADER=1 cargo test -p sar-capi --test header` rewrites the file.
//!
//! A test rather than a build script: the build of the library (and the firmware build) never
//! compiles cbindgen, and CI needs no extra step, since `cargo test --workspace` runs it.

use std::path::Path;

#[test]
fn committed_header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen")
        .write(&mut generated);
    let path = dir.join("include/sar.h");
    if std::env::var_os("SAR_BLESS_HEADER").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("writing include/sar.h");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    if committed != generated {
        let (a, b) = (
            String::from_utf8_lossy(&committed),
            String::from_utf8_lossy(&generated),
        );
        let first = a
            .lines()
            .zip(b.lines())
            .position(|(x, y)| x != y)
            .unwrap_or(a.lines().count().min(b.lines().count()));
        panic!(
            "include/sar.h is stale (first difference at line {}): regenerate it with \
             `SAR_BLESS_HEADER=1 cargo test -p sar-capi --test header` and commit it",
            first + 1
        );
    }
}
