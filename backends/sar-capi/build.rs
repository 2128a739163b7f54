//! Passes the target and host triples to the tests, which compile the C example with the `cc`
//! crate (it needs both, and cargo sets them only for build scripts).
fn main() {
    for key in ["TARGET", "HOST"] {
        let v = std::env::var(key).unwrap_or_default();
        println!("cargo:rustc-env=SAR_CAPI_{key}={v}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
