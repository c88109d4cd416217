//! The module map in `src/lib.rs` is true: a module imports (`crate::name`) only modules listed
//! above it in the table, so the layers never look up. Fails naming the file, the import and
//! the line when someone adds an upward edge; the fix is to move code down or the row up.

use std::path::{Path, PathBuf};

/// The table's module names, lowest layer first.
fn layers(lib: &str) -> Vec<String> {
    lib.lines()
        .filter_map(|l| l.strip_prefix("//! | "))
        .filter_map(|cell| {
            let name = cell.trim_start_matches('[').strip_prefix('`')?;
            let name = &name[..name.find('`')?];
            (name != "module").then(|| name.to_string())
        })
        .collect()
}

/// `src/NAME.rs`, or every `.rs` file under `src/NAME/`.
fn files_of(src: &Path, name: &str) -> Vec<PathBuf> {
    let single = src.join(format!("{name}.rs"));
    if single.exists() {
        return vec![single];
    }
    let mut out = Vec::new();
    let mut dirs = vec![src.join(name)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out
}

/// The `crate::x` names a line of code (not a comment) uses.
fn crate_refs(line: &str) -> Vec<&str> {
    let code = line.split("//").next().unwrap_or("");
    code.match_indices("crate::")
        .map(|(i, _)| {
            let rest = &code[i + "crate::".len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

#[test]
fn no_module_imports_one_above_it_in_the_lib_rs_map() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let order = layers(&lib);
    assert!(
        order.len() > 10,
        "the map in lib.rs was not found: {order:?}"
    );
    let mut upward = Vec::new();
    for (rank, module) in order.iter().enumerate() {
        let files = files_of(&src, module);
        assert!(!files.is_empty(), "{module} is in the map but has no file");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (n, line) in text.lines().enumerate() {
                for dep in crate_refs(line) {
                    let dep_rank = order.iter().position(|m| m == dep);
                    if dep_rank.is_some_and(|d| d > rank) {
                        upward.push(format!(
                            "{}:{}: {module} uses {dep}, which is above it",
                            file.display(),
                            n + 1
                        ));
                    }
                }
            }
        }
    }
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));
}

#[test]
fn the_map_lists_every_module_the_crate_declares() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let order = layers(&lib);
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| {
            let l = l.trim_start_matches("pub ");
            l.strip_prefix("mod ")?.strip_suffix(';')
        })
        .collect();
    for m in &declared {
        assert!(order.iter().any(|o| o == m), "mod {m} is not in the map");
    }
    assert_eq!(order.len(), declared.len(), "{order:?} vs {declared:?}");
}
