//! The crate's structure, checked: no import circle between the files of
//! `src/`, and no file over 600 lines of code without a reason at its top.
//!
//! Data flows one way (`src/lib.rs`): a file may name its own ancestor
//! modules (`super::`, the usual Rust idiom for a child), but two files
//! that reach each other, directly or round a longer loop, are a circle.
//! Every path is read: `crate::`, `super::` and `self::` paths, `use`
//! trees with braces (`use super::{a, b::c}`), and bare paths into a
//! child module or a module imported by name (`cluster::Router`,
//! `table::lower`). What cannot be resolved to a file is ignored; nothing
//! is invented. `../shared/tools/layers.py` reads the same graph less
//! strictly (it skips brace trees and bare paths).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Lines of code (tests apart) past which a file must say why at its top.
const MAX_LINES: usize = 600;
/// The `//!` marker that gives that reason.
const SIZE_REASON: &str = "//! Size:";

type Module = Vec<String>;

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Module path -> file, for every `.rs` file under `src/`.
fn modules(dir: &Path, root: &Path, out: &mut BTreeMap<Module, PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            modules(&p, root, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let rel = p.strip_prefix(root).expect("under src").with_extension("");
            let mut m: Module = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(m.last().map(String::as_str), Some("mod" | "lib" | "main")) {
                m.pop();
            }
            out.insert(m, p);
        }
    }
}

/// The text with comments and string/char literals blanked out.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let end = text[i + 2..].find("*/").map_or(b.len(), |e| i + 2 + e + 2);
            i = end;
            out.push(' ');
        } else if b[i] == b'"' {
            // A raw string (r"..", r#".."#) starts one or more bytes earlier;
            // its body has no escapes but also rarely holds a quote.
            let raw = i > 0 && (b[i - 1] == b'r' || b[i - 1] == b'#');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && !raw {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || b[i + 1] == b'\\') {
            // A char literal ('a', '\n'); lifetimes ('a) have no closing quote.
            let close = text[i + 1..].find('\'').map_or(b.len(), |e| i + 1 + e + 1);
            i = close;
            out.push_str("' '");
        } else {
            let ch = text[i..].chars().next().expect("in bounds");
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into full paths.
fn expand_tree(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = split_path(&tree[..open]);
        let mut base = prefix.to_vec();
        base.extend(head);
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand_tree(&inner[start..i], &base, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand_tree(&inner[start..], &base, out);
    } else {
        let tree = tree.split(" as ").next().unwrap_or("").trim();
        if tree.is_empty() {
            return;
        }
        let mut p = prefix.to_vec();
        p.extend(
            split_path(tree)
                .into_iter()
                .filter(|s| s != "self" && s != "*"),
        );
        out.push(p);
    }
}

fn split_path(s: &str) -> Vec<String> {
    s.split("::")
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect()
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path the file names, in module terms relative to the crate root.
fn paths(module: &Module, code: &str, children: &BTreeSet<String>) -> Vec<Vec<String>> {
    let mut raw: Vec<Vec<String>> = Vec::new();
    let mut imported: HashMap<String, Vec<String>> = HashMap::new();
    // `use` statements, braces included.
    for stmt in code.split(';') {
        let s = stmt.trim();
        // The last `use` keyword of the statement (a use tree holds none).
        let Some(at) = s
            .match_indices("use ")
            .map(|(i, _)| i)
            .filter(|&i| i == 0 || !is_ident(s[..i].chars().last().unwrap_or(' ')))
            .last()
        else {
            continue;
        };
        let before = s[..at].trim_end();
        if !(before.is_empty()
            || before.ends_with("pub")
            || before.ends_with(['(', ')', '{', '}', ']']))
        {
            continue;
        }
        let mut trees = Vec::new();
        expand_tree(&s[at + 4..], &[], &mut trees);
        for t in trees {
            if let Some(last) = t.last() {
                imported.insert(last.clone(), t.clone());
            }
            raw.push(t);
        }
    }
    // Paths in code: `a::b::c` runs of identifiers.
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if is_ident(chars[i]) && (i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':')) {
            let mut segs = Vec::new();
            let mut j = i;
            loop {
                let s = j;
                while j < chars.len() && is_ident(chars[j]) {
                    j += 1;
                }
                segs.push(chars[s..j].iter().collect::<String>());
                if j + 2 < chars.len()
                    && chars[j] == ':'
                    && chars[j + 1] == ':'
                    && is_ident(chars[j + 2])
                {
                    j += 2;
                } else {
                    break;
                }
            }
            if segs.len() > 1 {
                raw.push(segs);
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    let mut out = Vec::new();
    for p in raw {
        let Some(first) = p.first() else { continue };
        let resolved: Vec<String> = match first.as_str() {
            "crate" => p[1..].to_vec(),
            "super" | "self" => {
                let mut base = module.clone();
                let mut rest = &p[..];
                if rest[0] == "self" {
                    rest = &rest[1..];
                }
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop();
                    rest = &rest[1..];
                }
                base.extend(rest.iter().cloned());
                base
            }
            name if children.contains(name) => {
                let mut base = module.clone();
                base.extend(p.iter().cloned());
                base
            }
            name => match imported.get(name) {
                // A module imported by name and used as a path head.
                Some(full) if p.len() > 1 => {
                    let mut full = full.clone();
                    full.extend(p[1..].iter().cloned());
                    match full.first().map(String::as_str) {
                        Some("crate") => full[1..].to_vec(),
                        _ => continue,
                    }
                }
                _ => continue,
            },
        };
        out.push(resolved);
    }
    out
}

/// The file of the longest module prefix of `path`.
fn resolve<'a>(
    mods: &'a BTreeMap<Module, PathBuf>,
    path: &[String],
) -> Option<(&'a Module, &'a PathBuf)> {
    (1..=path.len())
        .rev()
        .find_map(|n| mods.get_key_value(&path[..n]))
}

/// Per module, the names it takes from one of its children (`pub use
/// child::{A, B}`, `use child::C`, or every public item of a glob `use
/// child::*`): a path into the module that names one of them is an arrow
/// to that child, not to the module (a sibling reached through its parent
/// is still a sibling).
fn taken_from_children(
    mods: &BTreeMap<Module, PathBuf>,
) -> HashMap<Module, HashMap<String, Module>> {
    let defined = |file: &PathBuf| -> Vec<String> {
        let code = code_only(&std::fs::read_to_string(file).expect("read source"));
        code.lines()
            .filter_map(|l| {
                let l = l
                    .strip_prefix("pub ")
                    .or_else(|| l.strip_prefix("pub(crate) "))?;
                let mut w = l.split_whitespace();
                let kind = w.next()?;
                let kind = if kind == "async" || kind == "const" && l.starts_with("const fn") {
                    w.next()?
                } else {
                    kind
                };
                matches!(
                    kind,
                    "struct" | "enum" | "fn" | "const" | "type" | "trait" | "static" | "mod"
                )
                .then(|| w.next())?
                .map(|n| {
                    n.split(|c: char| !is_ident(c))
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
            })
            .collect()
    };
    let mut out: HashMap<Module, HashMap<String, Module>> = HashMap::new();
    for (module, file) in mods {
        let code = code_only(&std::fs::read_to_string(file).expect("read source"));
        let mut names = HashMap::new();
        for stmt in code.split(';') {
            let s = stmt.trim();
            let Some(rest) = s
                .strip_prefix("pub use ")
                .or_else(|| s.strip_prefix("use "))
            else {
                continue;
            };
            let mut trees = Vec::new();
            expand_tree(rest, &[], &mut trees);
            for t in trees {
                let Some(child) = t.first() else { continue };
                let mut cm = module.clone();
                cm.push(child.clone());
                let Some(cfile) = mods.get(&cm) else { continue };
                match t.get(1) {
                    Some(name) => {
                        names.insert(name.clone(), cm.clone());
                    }
                    // `use child::*`, expanded by `expand_tree` to the child.
                    None if rest.trim_end().ends_with('*') => {
                        for n in defined(cfile) {
                            names.insert(n, cm.clone());
                        }
                    }
                    None => {}
                }
            }
        }
        out.insert(module.clone(), names);
    }
    out
}

/// File -> files it names, child-to-ancestor arrows left out (after a
/// name the ancestor takes from another child is followed to that child).
fn graph(mods: &BTreeMap<Module, PathBuf>) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let taken = taken_from_children(mods);
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for (module, file) in mods {
        let text = std::fs::read_to_string(file).expect("read source");
        let code = code_only(&text);
        let children: BTreeSet<String> = mods
            .keys()
            .filter(|m| m.len() == module.len() + 1 && m.starts_with(module))
            .filter_map(|m| m.last().cloned())
            .collect();
        let out = edges.entry(file.clone()).or_default();
        for p in paths(module, &code, &children) {
            // `crate::a` with `a` a module of lib.rs, from lib.rs: the root.
            let Some((mut target, mut tfile)) = resolve(mods, &p) else {
                continue;
            };
            // A name the module took from a child: the child (a few levels).
            for _ in 0..4 {
                let Some(name) = p.get(target.len()) else {
                    break;
                };
                let Some(child) = taken.get(target).and_then(|t| t.get(name)) else {
                    break;
                };
                let Some((m, f)) = mods.get_key_value(child) else {
                    break;
                };
                (target, tfile) = (m, f);
            }
            if tfile == file || module.starts_with(target) {
                continue;
            }
            out.insert(tfile.clone());
        }
    }
    edges
}

/// The floor of each top-level module, from the numbered list in the
/// `lib.rs` module doc (`//! 3. ... `config` ...`).
fn floors(lib: &str, tops: &BTreeSet<String>) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    let mut floor = 0;
    for line in lib.lines().take_while(|l| l.starts_with("//!")) {
        let l = line.trim_start_matches("//!").trim_start();
        if let Some((n, _)) = l.split_once(". ") {
            if let Ok(n) = n.parse::<usize>() {
                floor = n;
            }
        }
        if floor == 0 {
            continue;
        }
        for (i, part) in l.split('`').enumerate() {
            let name = part.split("::").next().unwrap_or("");
            if i % 2 == 1 && tops.contains(name) {
                out.entry(name.to_string()).or_insert(floor);
            }
        }
    }
    out
}

/// Strongly connected components of more than one file (Tarjan).
fn circles(edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Vec<Vec<PathBuf>> {
    struct T<'a> {
        edges: &'a BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        index: HashMap<&'a PathBuf, usize>,
        low: HashMap<&'a PathBuf, usize>,
        stack: Vec<&'a PathBuf>,
        on: BTreeSet<&'a PathBuf>,
        out: Vec<Vec<PathBuf>>,
    }
    fn strong<'a>(t: &mut T<'a>, v: &'a PathBuf) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        let edges = t.edges;
        for w in edges.get(v).into_iter().flatten() {
            if !t.index.contains_key(w) {
                strong(t, w);
                let lw = t.low[w];
                let lv = t.low[v];
                t.low.insert(v, lv.min(lw));
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low[v];
                t.low.insert(v, lv.min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        edges,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v) {
            strong(&mut t, v);
        }
    }
    t.out
}

fn all_modules() -> BTreeMap<Module, PathBuf> {
    let root = src_dir();
    let mut mods = BTreeMap::new();
    modules(&root, &root, &mut mods);
    mods
}

#[test]
fn no_import_circle_between_files() {
    let mods = all_modules();
    let edges = graph(&mods);
    let found = circles(&edges);
    let root = src_dir();
    let show = |p: &PathBuf| p.strip_prefix(&root).unwrap_or(p).display().to_string();
    let report: Vec<String> = found
        .iter()
        .map(|c| {
            let members: BTreeSet<&PathBuf> = c.iter().collect();
            let arrows: Vec<String> = c
                .iter()
                .flat_map(|a| {
                    edges[a]
                        .iter()
                        .filter(|b| members.contains(b))
                        .map(move |b| format!("{} -> {}", show(a), show(b)))
                })
                .collect();
            arrows.join(", ")
        })
        .collect();
    assert!(
        found.is_empty(),
        "import circles between files of src/ (data must flow one way, see src/lib.rs):\n{}",
        report.join("\n")
    );
}

/// The checker itself sees what layers.py misses: a brace `use` tree and a
/// bare path into a child module make arrows.
#[test]
fn the_circle_check_reads_brace_trees_and_bare_child_paths() {
    let m: Module = vec!["cmd".into(), "local".into()];
    let code =
        code_only("use super::{Client, clients};\nfn f() { table::lower(x); } // crate::nope\n");
    let children = BTreeSet::new();
    let p = paths(&m, &code, &children);
    assert!(
        p.contains(&vec!["cmd".to_string(), "clients".to_string()]),
        "{p:?}"
    );
    assert!(!p.iter().any(|x| x.contains(&"nope".to_string())), "{p:?}");
    let m: Module = vec!["upstream".into()];
    let children: BTreeSet<String> = ["cluster".to_string()].into();
    let p = paths(
        &m,
        &code_only("fn f() { cluster::Router::new() }"),
        &children,
    );
    assert!(
        p.contains(&vec![
            "upstream".into(),
            "cluster".into(),
            "Router".into(),
            "new".into()
        ]),
        "{p:?}"
    );
    let edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = [
        ("a".into(), ["b".into()].into()),
        ("b".into(), ["c".into()].into()),
        ("c".into(), ["a".into()].into()),
    ]
    .into();
    assert_eq!(circles(&edges).len(), 1);
}

#[test]
fn no_big_file_without_a_reason() {
    let mut big = Vec::new();
    for file in all_modules().values() {
        let text = std::fs::read_to_string(file).expect("read source");
        let lines: Vec<&str> = text.lines().collect();
        let code = lines
            .windows(2)
            .position(|w| {
                w[0].trim() == "#[cfg(test)]" && w[1].trim_start().starts_with("mod tests")
            })
            .unwrap_or(lines.len());
        let reason = lines
            .iter()
            .take_while(|l| l.starts_with("//!"))
            .any(|l| l.starts_with(SIZE_REASON));
        if code > MAX_LINES && !reason {
            big.push(format!("{} ({code} lines of code)", file.display()));
        }
    }
    assert!(
        big.is_empty(),
        "files over {MAX_LINES} lines of code with no `{SIZE_REASON}` line at the top:\n{}",
        big.join("\n")
    );
}

/// Every arrow runs to the same floor or below, as `lib.rs` lists them, and
/// every top-level module has a floor.
#[test]
fn imports_run_down_the_floors_of_lib_rs() {
    let mods = all_modules();
    let root = src_dir();
    let tops: BTreeSet<String> = mods
        .keys()
        .filter(|m| !m.is_empty())
        .map(|m| m[0].clone())
        .filter(|t| t != "main")
        .collect();
    let lib = std::fs::read_to_string(root.join("lib.rs")).expect("lib.rs");
    let floor = floors(&lib, &tops);
    let unplaced: Vec<&String> = tops.iter().filter(|t| !floor.contains_key(*t)).collect();
    assert!(
        unplaced.is_empty(),
        "modules lib.rs places on no floor: {unplaced:?}"
    );
    let top_of = |f: &PathBuf| -> Option<String> {
        let m = mods.iter().find(|(_, p)| *p == f)?.0;
        m.first().cloned()
    };
    let mut up = Vec::new();
    for (from, tos) in graph(&mods) {
        let Some(a) = top_of(&from) else { continue };
        for to in tos {
            let Some(b) = top_of(&to) else { continue };
            if let (Some(fa), Some(fb)) = (floor.get(&a), floor.get(&b)) {
                if fa < fb {
                    up.push(format!(
                        "{} (floor {fa}) -> {} (floor {fb})",
                        from.strip_prefix(&root).unwrap_or(&from).display(),
                        to.strip_prefix(&root).unwrap_or(&to).display()
                    ));
                }
            }
        }
    }
    assert!(
        up.is_empty(),
        "imports running up the floors of lib.rs:\n{}",
        up.join("\n")
    );
}

/// No glob import of a sibling or a child outside tests (`use super::*`,
/// `use child::*`): it hides which file a name comes from. A schema's
/// `pub use table::*` re-export (config) is read by the circle check.
#[test]
fn no_private_glob_imports_outside_tests() {
    let mut found = Vec::new();
    for file in all_modules().values() {
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read source");
        for (i, line) in text.lines().enumerate() {
            if line.starts_with("use ") && line.trim_end().ends_with("::*;") {
                found.push(format!("{}:{}: {line}", file.display(), i + 1));
            }
        }
    }
    assert!(found.is_empty(), "glob imports:\n{}", found.join("\n"));
}
