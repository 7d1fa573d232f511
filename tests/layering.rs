//! The module graph stays layered: every `crate::` and `super::` path in `src/` is an edge, and
//! each edge must point down the layer order that ARCHITECTURE.md's module map gives (top row
//! highest). Files inside one top-level module must not import each other in a circle either.
//! A new module that the map does not list fails here until ARCHITECTURE.md says where it sits.
#![allow(clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `src/a/b.rs` → `a::b`, `src/a/mod.rs` → `a`; the crate root and the binary are not modules.
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(Path::new(ROOT).join("src")).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    let path = parts.join("::");
    (!matches!(path.as_str(), "lib" | "main")).then_some(path)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its unit tests (by convention, a `#[cfg(test)]` module at the end)
/// and without comment lines.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every module path a file names: `crate::a::b::Item`, `crate::a::{b, c::D}` and `super::…`
/// resolved against `module`.
fn referenced_paths(module: &str, code: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut previous = ' ';
    for (start, c) in code.char_indices() {
        let before = std::mem::replace(&mut previous, c);
        // Not inside a longer path (`super::super::x` is read once, from its first `super`).
        if is_ident(before) || code[..start].ends_with("::") {
            continue;
        }
        let rest = &code[start..];
        let mut base: Vec<String> = if rest.starts_with("crate::") {
            Vec::new()
        } else if rest.starts_with("super::") {
            // In `a/b.rs` (module a::b), `super` is `a`.
            let mut m: Vec<String> = module.split("::").map(str::to_owned).collect();
            m.pop();
            m
        } else {
            continue;
        };
        let mut tail = rest.split_once("::").map(|(_, t)| t).unwrap_or_default();
        while let Some(t) = tail.strip_prefix("super::") {
            base.pop();
            tail = t;
        }
        paths_in(base, tail, &mut found);
    }
    found
}

/// The paths `prefix` + `text` names, where `text` is `a::b::c…` or `a::{b, c::{d}}…`.
fn paths_in(mut prefix: Vec<String>, mut text: &str, out: &mut Vec<Vec<String>>) {
    loop {
        let text_trimmed = text.trim_start();
        if let Some(group) = text_trimmed.strip_prefix('{') {
            for item in split_group(group) {
                paths_in(prefix.clone(), item, out);
            }
            return;
        }
        let ident: String = text_trimmed.chars().take_while(|c| is_ident(*c)).collect();
        if ident.is_empty() {
            out.push(prefix);
            return;
        }
        let after = &text_trimmed[ident.len()..];
        prefix.push(ident);
        match after.strip_prefix("::") {
            Some(next) => text = next,
            None => {
                out.push(prefix);
                return;
            }
        }
    }
}

/// The top-level items of a `{…}` group (the text after its `{`).
fn split_group(group: &str) -> Vec<&str> {
    let (mut depth, mut start, mut items) = (0usize, 0usize, Vec::new());
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..i]);
                return items;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items
}

/// The longest known module that `path` starts with.
fn resolve(path: &[String], modules: &BTreeSet<String>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|m| modules.contains(m))
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

fn is_ancestor(a: &str, b: &str) -> bool {
    b.starts_with(a) && b[a.len()..].starts_with("::")
}

/// Module → the modules it imports, ignoring a module's own ancestors and descendants.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&Path::new(ROOT).join("src"), &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(from) = module_of(file) else {
            continue;
        };
        let text = fs::read_to_string(file).expect("read source");
        let targets = edges.entry(from.clone()).or_default();
        for path in referenced_paths(&from, &code(&text)) {
            let Some(to) = resolve(&path, &modules) else {
                continue;
            };
            if to != from && !is_ancestor(&to, &from) && !is_ancestor(&from, &to) {
                targets.insert(to);
            }
        }
    }
    edges
}

/// The top-level modules in the order of ARCHITECTURE.md's module map, highest layer first:
/// the first backticked name of each table row under `## Module map`.
fn layers() -> Vec<String> {
    let doc = fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md")).expect("read ARCHITECTURE.md");
    let section = doc
        .split("\n## Module map")
        .nth(1)
        .expect("ARCHITECTURE.md has a `## Module map` section");
    let section = section.split("\n## ").next().unwrap_or_default();
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('`').nth(1))
        .map(|name| name.trim_end_matches('/').to_owned())
        .collect()
}

/// A circle among `edges`, if there is one (depth-first search with colours).
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        stack.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|n| n == next).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(next, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if state.get(node.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(node, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn every_import_points_down_the_layers() {
    let order = layers();
    assert!(order.len() > 5, "the module map lists too few modules: {order:?}");
    let rank = |m: &str| order.iter().position(|l| l == top(m));
    let edges = graph();
    let mut problems = Vec::new();
    for module in edges.keys() {
        if rank(module).is_none() {
            problems.push(format!("{module}: not in ARCHITECTURE.md's module map"));
        }
    }
    for (from, targets) in &edges {
        for to in targets {
            let (Some(f), Some(t)) = (rank(from), rank(to)) else {
                continue;
            };
            // Lower rows are lower layers; within one top-level module, the circle check applies.
            if t <= f && top(from) != top(to) {
                problems.push(format!(
                    "{from} imports {to}, which is not below it in ARCHITECTURE.md's module map"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "layering broken:\n{}", problems.join("\n"));
}

#[test]
fn no_module_imports_itself_in_a_circle() {
    let edges = graph();
    if let Some(cycle) = find_cycle(&edges) {
        panic!("import circle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_checker_sees_crate_and_super_paths() {
    let code = "use crate::tls::{certs::{self, Issued}, Negotiated};\nlet x = super::super::io::BoxStream;\nuse crate::names;";
    let paths = referenced_paths("ssh::handler", code);
    let joined: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(
        joined,
        [
            "tls::certs::self",
            "tls::certs::Issued",
            "tls::Negotiated",
            "io::BoxStream",
            "names"
        ]
    );
    let modules: BTreeSet<String> = ["tls", "tls::certs", "io"].map(String::from).into();
    let path: Vec<String> = ["tls", "certs", "load_table"].map(String::from).into();
    assert_eq!(resolve(&path, &modules).as_deref(), Some("tls::certs"));
    let mut circle = BTreeMap::new();
    circle.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    circle.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(
        find_cycle(&circle),
        Some(vec!["a".into(), "b".into(), "a".into()])
    );
}
