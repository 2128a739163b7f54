//! The workspace's layering, checked from `cargo metadata`: no crate depends on a layer above it.
//!
//! Layers, bottom to top, by the crate's manifest path relative to the workspace root (so a crate
//! added later under one of these folders is checked without editing this file):
//!
//! | path | layer | may depend on (workspace crates) |
//! |---|---|---|
//! | `sar-math/` | math | nothing in the workspace; outside it only [`MATH_ALLOWED`] |
//! | `backends/*/` | backend | math, backends |
//! | `models/*/` | model | math, backends (and, for dev-dependencies only, other model crates: a library's networks are tested against another's) |
//! | `trainers/*/` | trainer | math, backends, models, trainers |
//! | `tests/conformance/` | conformance | math, backends |
//!
//! Normal, dev and build dependencies are all checked. Edges allowed against these rules would be
//! listed in [`ALLOWED_EXCEPTIONS`] (none today). A workspace crate at any other path is itself an error:
//! give it a layer here.

use serde_json::Value;
use std::path::{Component, Path};
use std::process::Command;

/// The only crates `sar-math` may depend on (normal and build dependencies), and whether each
/// must stay optional. Its dev-dependencies may be any crate outside the workspace.
const MATH_ALLOWED: &[(&str, bool)] = &[
    ("num-traits", false),
    ("libm", false),
    ("heapless", false),
    ("serde", true),
];

/// Edges that break the rules but exist on purpose: (from, to, kind). None today.
const ALLOWED_EXCEPTIONS: &[(&str, &str, &str)] = &[];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    Math,
    Backend,
    Model,
    Trainer,
    Conformance,
}

impl Layer {
    fn name(self) -> &'static str {
        match self {
            Layer::Math => "math",
            Layer::Backend => "backend",
            Layer::Model => "model",
            Layer::Trainer => "trainer",
            Layer::Conformance => "conformance",
        }
    }

    /// The layers a crate of this layer may depend on.
    fn may_use(self) -> &'static [Layer] {
        match self {
            Layer::Math => &[],
            Layer::Backend => &[Layer::Math, Layer::Backend],
            Layer::Model => &[Layer::Math, Layer::Backend],
            Layer::Trainer => &[Layer::Math, Layer::Backend, Layer::Model, Layer::Trainer],
            Layer::Conformance => &[Layer::Math, Layer::Backend],
        }
    }

    /// The layer of a crate whose manifest folder is `dir` (relative to the workspace root).
    fn of(dir: &Path) -> Option<Layer> {
        let parts: Vec<String> = dir
            .components()
            .map(|c| match c {
                Component::Normal(s) => s.to_string_lossy().into_owned(),
                other => other.as_os_str().to_string_lossy().into_owned(),
            })
            .collect();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        match parts.as_slice() {
            ["sar-math"] => Some(Layer::Math),
            ["backends", _] => Some(Layer::Backend),
            ["models", _] => Some(Layer::Model),
            ["trainers", _] => Some(Layer::Trainer),
            ["tests", "conformance"] => Some(Layer::Conformance),
            _ => None,
        }
    }
}

fn kind_name(dep: &Value) -> &str {
    dep["kind"].as_str().unwrap_or("normal")
}

/// Every layering violation in `cargo metadata --format-version 1 --no-deps` output, one line
/// each, naming the edge.
fn violations(metadata: &Value) -> Vec<String> {
    let root = Path::new(
        metadata["workspace_root"]
            .as_str()
            .expect("metadata has workspace_root"),
    );
    let packages = metadata["packages"].as_array().expect("metadata packages");
    let members: Vec<&str> = metadata["workspace_members"]
        .as_array()
        .expect("metadata workspace_members")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // name → (relative folder, layer) for every workspace member.
    let mut crates = Vec::new();
    let mut problems = Vec::new();
    for p in packages {
        let id = p["id"].as_str().unwrap_or_default();
        if !members.contains(&id) {
            continue;
        }
        let name = p["name"].as_str().expect("package name").to_string();
        let manifest = Path::new(p["manifest_path"].as_str().expect("manifest_path"));
        let dir = manifest
            .parent()
            .and_then(|d| d.strip_prefix(root).ok())
            .unwrap_or(manifest)
            .to_path_buf();
        match Layer::of(&dir) {
            Some(layer) => crates.push((name, dir, layer, p)),
            None => problems.push(format!(
                "{name} ({}) is not under sar-math/, backends/*/, models/*/, trainers/*/ or \
                 tests/conformance/: give it a layer in tests/conformance/tests/workspace_layers.rs",
                dir.display()
            )),
        }
    }
    for (name, dir, layer, p) in &crates {
        for dep in p["dependencies"].as_array().expect("dependencies") {
            let to = dep["name"].as_str().expect("dependency name");
            let kind = kind_name(dep);
            let target = crates.iter().find(|(n, ..)| n == to);
            match target {
                Some((_, to_dir, to_layer, _)) => {
                    // A model crate's tests may compare it with another library's models.
                    let cross_library_test =
                        kind == "dev" && *layer == Layer::Model && *to_layer == Layer::Model;
                    if layer.may_use().contains(to_layer)
                        || cross_library_test
                        || ALLOWED_EXCEPTIONS.contains(&(name.as_str(), to, kind))
                    {
                        continue;
                    }
                    let allowed: Vec<&str> = layer.may_use().iter().map(|l| l.name()).collect();
                    problems.push(format!(
                        "{name} ({}, {} layer) has a {kind} dependency on {to} ({}, {} layer); \
                         a {} crate may depend only on: {}",
                        dir.display(),
                        layer.name(),
                        to_dir.display(),
                        to_layer.name(),
                        layer.name(),
                        if allowed.is_empty() {
                            "no workspace crate".to_string()
                        } else {
                            allowed.join(", ")
                        }
                    ));
                }
                None if *layer == Layer::Math && kind != "dev" => {
                    let optional = dep["optional"].as_bool().unwrap_or(false);
                    match MATH_ALLOWED.iter().find(|(n, _)| *n == to) {
                        None => problems.push(format!(
                            "{name} has a {kind} dependency on {to}; sar-math may depend only on {}",
                            MATH_ALLOWED
                                .iter()
                                .map(|(n, o)| if *o {
                                    format!("{n} (optional)")
                                } else {
                                    n.to_string()
                                })
                                .collect::<Vec<_>>()
                                .join(", ")
                        )),
                        Some((_, true)) if !optional => problems.push(format!(
                            "{name} has a non-optional {kind} dependency on {to}, which must stay \
                             optional"
                        )),
                        Some(_) => {}
                    }
                }
                None => {}
            }
        }
    }
    problems
}

fn workspace_metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let out = Command::new(&cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(&manifest)
        .output()
        .unwrap_or_else(|e| panic!("could not run `{cargo} metadata`: {e}"));
    assert!(
        out.status.success(),
        "`{cargo} metadata` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

#[test]
fn no_crate_depends_on_a_layer_above_it() {
    let metadata = workspace_metadata();
    let names: Vec<&str> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for known in [
        "sar-math",
        "sar-cpu",
        "sar-models",
        "sar-train",
        "sar-conformance",
    ] {
        assert!(
            names.contains(&known),
            "cargo metadata lists no {known}: {names:?}"
        );
    }
    let problems = violations(&metadata);
    assert!(
        problems.is_empty(),
        "workspace layering violated:\n  {}",
        problems.join("\n  ")
    );
}

/// The checker itself: a synthetic workspace with one edge of each kind of mistake.
#[test]
fn the_check_names_forbidden_edges() {
    let dep = |name: &str, kind: Option<&str>, optional: bool| serde_json::json!({ "name": name, "kind": kind, "optional": optional });
    let pkg = |name: &str, dir: &str, deps: Vec<Value>| {
        serde_json::json!({
            "id": format!("{name} 0.1.0"),
            "name": name,
            "manifest_path": format!("/ws/{dir}/Cargo.toml"),
            "dependencies": deps,
        })
    };
    let packages = vec![
        pkg(
            "sar-math",
            "sar-math",
            vec![
                dep("libm", None, false),
                dep("serde", None, false),
                dep("rand", None, false),
                dep("proptest", Some("dev"), false),
            ],
        ),
        pkg(
            "sar-cpu",
            "backends/sar-cpu",
            vec![
                dep("sar-math", None, false),
                dep("sar-new-models", Some("build"), false),
            ],
        ),
        pkg(
            "sar-new-models",
            "models/sar-new-models",
            vec![dep("sar-cpu", None, false), dep("sar-data", None, false)],
        ),
        pkg(
            "sar-data",
            "trainers/sar-data",
            vec![dep("sar-new-models", None, false)],
        ),
        pkg(
            "sar-conformance",
            "tests/conformance",
            vec![dep("sar-data", Some("dev"), false)],
        ),
        pkg("stray", "tools/stray", vec![]),
    ];
    let members: Vec<Value> = packages.iter().map(|p| p["id"].clone()).collect();
    let metadata = serde_json::json!({
        "workspace_root": "/ws",
        "workspace_members": members,
        "packages": packages,
    });
    let problems = violations(&metadata);
    let has = |needle: &str| problems.iter().any(|p| p.contains(needle));
    assert!(has("stray (tools/stray) is not under"), "{problems:#?}");
    assert!(
        has("non-optional normal dependency on serde"),
        "{problems:#?}"
    );
    assert!(
        has("sar-math has a normal dependency on rand"),
        "{problems:#?}"
    );
    assert!(
        has("sar-cpu (backends/sar-cpu, backend layer) has a build dependency on sar-new-models"),
        "{problems:#?}"
    );
    assert!(
        has("sar-new-models (models/sar-new-models, model layer) has a normal dependency on sar-data"),
        "{problems:#?}"
    );
    assert!(
        has("sar-conformance (tests/conformance, conformance layer) has a dev dependency on sar-data"),
        "{problems:#?}"
    );
    assert_eq!(problems.len(), 6, "{problems:#?}");
}
