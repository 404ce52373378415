//! ARCHITECTURE.md's invariants, checked where a test can see them (in the manner of
//! rust-analyzer's `tidy`): a change that breaks one fails here, naming the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/`, relative to the crate root, with its text.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    walk(&root.join("src"), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
            (rel, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// The file's code, without comment lines (comments may name what the code must not do).
fn code(text: &str) -> String {
    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n").to_lowercase()
}

/// The files whose code contains any of `needles`.
fn files_with(needles: &[&str]) -> BTreeSet<String> {
    sources()
        .into_iter()
        .filter(|(_, text)| {
            let code = code(text);
            needles.iter().any(|n| code.contains(n))
        })
        .map(|(path, _)| path)
        .collect()
}

fn set(paths: &[&str]) -> BTreeSet<String> {
    paths.iter().map(|p| p.to_string()).collect()
}

#[test]
fn every_source_file_is_in_the_code_map() {
    let map = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md")).unwrap();
    let missing: Vec<String> = sources()
        .into_iter()
        .map(|(path, _)| path)
        .filter(|path| {
            // Named in full, or its folder is named and the file by its name.
            let (folder, name) = path.rsplit_once('/').unwrap();
            !(map.contains(path.as_str())
                || (map.contains(&format!("{folder}/")) && map.contains(&format!("`{name}`"))))
        })
        .collect();
    assert!(missing.is_empty(), "files missing from ARCHITECTURE.md's code map: {missing:?}");
}

#[test]
fn call_data_is_written_only_by_apply_and_the_fixture_writers() {
    assert_eq!(files_with(&["update {table}", "update calls", "update call_groups"]), set(&["src/apply/write.rs"]));
    // The demo loads its sample calls; `gen` writes the benchmark's.
    assert_eq!(
        files_with(&["insert into calls", "insert into call_groups", "copy calls", "copy call_groups"]),
        set(&["src/datagen.rs", "src/demo.rs"])
    );
}

#[test]
fn events_are_written_only_by_the_ledger() {
    let writers =
        files_with(&["insert into events", "update events", "delete from events", "insert into event_history"]);
    assert!(writers.iter().all(|f| f.starts_with("src/ledger/")), "{writers:?}");
    assert!(!writers.is_empty());
}

#[test]
fn the_conductor_holds_no_sql_and_only_drivers_call_it() {
    assert!(
        !code(&std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/run/mod.rs")).unwrap())
            .contains("sqlx::query")
    );
    let callers: BTreeSet<String> =
        files_with(&["crate::run", "callrecon::run"]).into_iter().filter(|p| !p.starts_with("src/run/")).collect();
    assert_eq!(callers, set(&["src/demo.rs", "src/main.rs", "src/metrics.rs", "src/resolve.rs", "src/schedule.rs"]));
}

#[test]
fn the_environment_is_read_only_by_tuning() {
    assert_eq!(files_with(&["env::var"]), set(&["src/tuning.rs"]));
    assert_eq!(files_with(&["tuning::from_env"]), set(&["src/resolve.rs", "src/run/mod.rs", "src/suggest/mod.rs"]));
}

#[test]
fn the_modules_import_each_other_without_a_cycle() {
    // Top-level module of each file -> the top-level modules it names.
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, text) in sources() {
        let module = path.trim_start_matches("src/").split(['/', '.']).next().unwrap().to_owned();
        let deps = graph.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() && name != module {
                deps.insert(name);
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit<'g>(
        m: &'g str,
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'g str>,
        done: &mut BTreeSet<&'g str>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = path.iter().position(|p| *p == m) {
            panic!("modules import each other in a cycle: {}", [&path[at..], &[m]].concat().join(" -> "));
        }
        path.push(m);
        for d in graph.get(m).into_iter().flatten() {
            visit(d, graph, path, done);
        }
        path.pop();
        done.insert(m);
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn stages_do_not_import_the_conductor_or_a_later_stage() {
    // The pipeline's order: a stage may use what comes before it, never what comes after.
    let order = ["ingest", "matching", "apply", "report"];
    for (path, text) in sources() {
        let module = path.trim_start_matches("src/").split(['/', '.']).next().unwrap();
        let Some(rank) = order.iter().position(|m| *m == module) else { continue };
        let code = code(&text);
        assert!(!code.contains("crate::run"), "{path} imports the conductor");
        for later in &order[rank + 1..] {
            // `report` may name ingest's file entries, which it lists; nothing goes the other way.
            assert!(!code.contains(&format!("crate::{later}")), "{path} imports {later}, a later stage");
        }
    }
}

/// Issue 43: the runs chart was built with `format!` and its own escaper and inserted with
/// `from_safe_string`, the one bypass of autoescaping. Every page goes through its templates'
/// autoescaping; nothing is marked safe.
#[test]
fn pages_are_rendered_only_through_autoescaping_templates() {
    assert_eq!(files_with(&["from_safe_string", "value::from_safe"]), BTreeSet::new());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["src/serve/review/templates", "src/report/templates"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap().replace(' ', "");
            assert!(
                !text.contains("|safe") && !text.contains("autoescape"),
                "{} bypasses autoescaping",
                path.display()
            );
        }
    }
}
