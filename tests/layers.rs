//! Arrows go one way: no module of `src/` names a module of a higher layer than its own, in
//! the map of docs/ARCHITECTURE.md ("Layers"). Reads the sources (every `crate::module` a
//! line of code names, comments aside); pure, no services.
//!
//! The arrows that still point up are listed in `KNOWN`, each with why; the test fails on a
//! new one, and on a listed one that is gone (so the list only shrinks).

use std::collections::BTreeSet;
use std::path::Path;

/// The layers, bottom first (docs/ARCHITECTURE.md).
const LAYERS: &[&[&str]] = &[
    &[
        "fault", "clock", "metrics", "escape", "credits", "secret", "names", "settings",
    ],
    &["event", "rating", "demo"],
    &["ledger", "alerts", "analytics", "kafka", "retry"],
    &["config", "commands", "pipeline"],
    &["reconcile", "api", "cli", "app"],
];

/// (file, module it names): the arrows that still point up.
const KNOWN: &[(&str, &str)] = &[];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level module a file of `src/` belongs to (`src/ledger/store.rs` -> `ledger`).
fn module_of(rel: &str) -> &str {
    let first = rel.split('/').next().unwrap();
    first.strip_suffix(".rs").unwrap_or(first)
}

/// Every `crate::x` a line of code names, with `crate::{x, y::z}` groups opened.
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                out.insert(name);
            }
        } else {
            out.insert(
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    out
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_names_a_module_above_its_own() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    let mut upward: BTreeSet<(String, String)> = BTreeSet::new();
    let mut unmapped: BTreeSet<String> = BTreeSet::new();
    for file in files {
        let rel = file.strip_prefix(root.join("src")).unwrap();
        let rel = rel.to_str().unwrap().replace('\\', "/");
        let own = module_of(&rel);
        if own == "lib" || own == "main" {
            continue; // the crate root and the binary sit above every module
        }
        let Some(own_layer) = layer(own) else {
            unmapped.insert(own.to_owned());
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.lines() {
            let code = line.split("//").next().unwrap();
            for named in named_modules(code) {
                match layer(&named) {
                    Some(l) if l > own_layer => {
                        upward.insert((format!("src/{rel}"), named));
                    }
                    Some(_) => {}
                    None => {
                        unmapped.insert(named);
                    }
                }
            }
        }
    }
    assert!(
        unmapped.is_empty(),
        "modules missing from the layer map (add them here and to docs/ARCHITECTURE.md): {unmapped:?}"
    );
    let known: BTreeSet<(String, String)> = KNOWN
        .iter()
        .map(|(f, m)| (f.to_string(), m.to_string()))
        .collect();
    let new: Vec<_> = upward.difference(&known).collect();
    assert!(
        new.is_empty(),
        "these files name a module of a higher layer (docs/ARCHITECTURE.md, Layers): {new:?}"
    );
    let gone: Vec<_> = known.difference(&upward).collect();
    assert!(
        gone.is_empty(),
        "these arrows no longer point up: remove them from KNOWN and docs/ARCHITECTURE.md: {gone:?}"
    );
}

#[test]
fn groups_and_paths_are_read() {
    assert_eq!(
        named_modules("use crate::{ledger::Store, kafka}; let x = crate::api::run;"),
        ["api", "kafka", "ledger"]
            .into_iter()
            .map(String::from)
            .collect()
    );
}
