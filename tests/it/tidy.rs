//! ARCHITECTURE.md's invariants, checked where a test can see them (in the manner of
//! rust-analyzer's `tidy`): a change that breaks one fails here, naming the file.
//!
//! The code is read as tokens (a small Rust lexer below: comments gone, `use` trees expanded,
//! string literals read as the SQL they hold), not searched as text. Each check is a function from the
//! sources to the violations it finds; a test runs it on the crate (none) and on the crate with a
//! violation planted (found), so a check that cannot see what it guards fails too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A token of Rust source, groups nested (a lexer is all these checks need; `syn` or
/// `proc-macro2` as a dev-dependency would rebuild every proc-macro and polars with it).
#[derive(Debug, Clone)]
enum Tok {
    Ident(String),
    Punct(char),
    /// A literal as written: `"…"`, `r#"…"#`, `'c'`, `42`.
    Lit(String),
    /// `(`, `[` or `{`, and what it holds.
    Group(char, Vec<Tok>),
}

/// Rust source as tokens: comments (doc comments too) dropped, literals kept whole.
fn lex(text: &str) -> Vec<Tok> {
    let c: Vec<char> = text.chars().collect();
    let mut stack: Vec<(char, Vec<Tok>)> = vec![(' ', Vec::new())];
    let mut i = 0;
    let ident_start = |ch: char| ch.is_alphabetic() || ch == '_';
    let ident_char = |ch: char| ch.is_alphanumeric() || ch == '_';
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        let push = |stack: &mut Vec<(char, Vec<Tok>)>, t: Tok| stack.last_mut().unwrap().1.push(t);
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && next == Some('*') {
            let (mut depth, mut j) = (1, i + 2);
            while j < c.len() && depth > 0 {
                if c[j] == '/' && c.get(j + 1) == Some(&'*') {
                    depth += 1;
                    j += 1;
                } else if c[j] == '*' && c.get(j + 1) == Some(&'/') {
                    depth -= 1;
                    j += 1;
                }
                j += 1;
            }
            i = j;
        } else if let Some(end) = string_end(&c, i) {
            push(&mut stack, Tok::Lit(c[i..end].iter().collect()));
            i = end;
        } else if ch == '\'' {
            // A char literal ('x', '\n', '\u{..}'), or a lifetime ('a).
            let end = if next == Some('\\') {
                (i + 3..c.len()).find(|&j| c[j] == '\'').map(|j| j + 1)
            } else if c.get(i + 2) == Some(&'\'') {
                Some(i + 3)
            } else {
                None
            };
            match end {
                Some(end) => {
                    push(&mut stack, Tok::Lit(c[i..end].iter().collect()));
                    i = end;
                }
                None => {
                    push(&mut stack, Tok::Punct('\''));
                    i += 1;
                }
            }
        } else if ident_start(ch) {
            let start =
                if ch == 'r' && next == Some('#') && c.get(i + 2).is_some_and(|&x| ident_start(x)) { i + 2 } else { i };
            let mut j = start;
            while j < c.len() && ident_char(c[j]) {
                j += 1;
            }
            push(&mut stack, Tok::Ident(c[start..j].iter().collect()));
            i = j;
        } else if ch.is_ascii_digit() {
            let mut j = i;
            while j < c.len() && (ident_char(c[j]) || c[j] == '.' && c.get(j + 1).is_some_and(|d| d.is_ascii_digit())) {
                j += 1;
            }
            push(&mut stack, Tok::Lit(c[i..j].iter().collect()));
            i = j;
        } else if matches!(ch, '(' | '[' | '{') {
            stack.push((ch, Vec::new()));
            i += 1;
        } else if matches!(ch, ')' | ']' | '}') {
            let (open, inner) = stack.pop().expect("balanced delimiters");
            push(&mut stack, Tok::Group(open, inner));
            i += 1;
        } else {
            push(&mut stack, Tok::Punct(ch));
            i += 1;
        }
    }
    assert_eq!(stack.len(), 1, "unbalanced delimiters");
    stack.pop().unwrap().1
}

/// Where a string literal starting at `i` ends (`"…"`, `b"…"`, `c"…"`, `r#"…"#`, `br"…"`).
fn string_end(c: &[char], i: usize) -> Option<usize> {
    let mut j = i;
    if matches!(c[j], 'b' | 'c') {
        j += 1;
    }
    if c.get(j) == Some(&'r') {
        j += 1;
        let hashes = c[j..].iter().take_while(|&&h| h == '#').count();
        j += hashes;
        if c.get(j) != Some(&'"') {
            return None;
        }
        let close: Vec<char> = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
        return (j + 1..c.len()).find(|&k| c[k..].starts_with(&close)).map(|k| k + close.len());
    }
    if c.get(j) != Some(&'"') {
        return None;
    }
    let mut k = j + 1;
    while k < c.len() {
        match c[k] {
            '\\' => k += 2,
            '"' => return Some(k + 1),
            _ => k += 1,
        }
    }
    None
}

/// One source file: its path (`src/…`), its module path, and what the checks look at.
struct Source {
    path: String,
    /// Module paths (`["decide", "pages"]`) it names, resolved from `crate::`, `super::`,
    /// `self::`, the crate's name and its own child modules; `use` groups expanded.
    names: Vec<Vec<String>>,
    /// Its string literals (doc comments left out), lowercased, whitespace collapsed.
    literals: Vec<String>,
    /// Its identifiers in order, outside attributes.
    idents: Vec<String>,
    /// The tokens of its attributes (`#[arg(long, env = "X")]`), one string per attribute.
    attributes: Vec<String>,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `src/`, parsed.
fn crate_sources() -> Vec<Source> {
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
    let mut files = Vec::new();
    walk(&root().join("src"), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(root()).unwrap().to_string_lossy().replace('\\', "/");
            parse(&rel, &std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// The crate's sources with `path`'s text replaced by (or, new, added as) `text`.
fn planted(path: &str, text: &str) -> Vec<Source> {
    let mut sources: Vec<Source> = crate_sources().into_iter().filter(|s| s.path != path).collect();
    sources.push(parse(path, text));
    sources
}

/// The crate's sources with `line` added to the end of `path`.
fn planted_line(path: &str, line: &str) -> Vec<Source> {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    planted(path, &format!("{text}\n{line}\n"))
}

/// The module path of a file: `src/decide/pages.rs` → `decide::pages`, `src/decide/mod.rs` →
/// `decide`; `lib.rs` and `main.rs` are the root.
fn module_of(path: &str) -> Vec<String> {
    let rel = path.trim_start_matches("src/").trim_end_matches(".rs");
    let mut parts: Vec<String> = rel.split('/').map(str::to_owned).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

fn parse(path: &str, text: &str) -> Source {
    let tokens = lex(text);
    let module = module_of(path);
    let children = child_modules(&tokens);
    let mut source = Source {
        path: path.to_owned(),
        names: Vec::new(),
        literals: Vec::new(),
        idents: Vec::new(),
        attributes: Vec::new(),
    };
    walk_tokens(&tokens, &module, &children, &mut source);
    source
}

/// The modules a file declares with `mod name;` (its files), whose names its paths may start with.
fn child_modules(tokens: &[Tok]) -> BTreeSet<String> {
    tokens
        .windows(3)
        .filter_map(|w| match w {
            [Tok::Ident(m), Tok::Ident(name), Tok::Punct(';')] if m == "mod" => Some(name.clone()),
            _ => None,
        })
        .collect()
}

fn walk_tokens(tokens: &[Tok], module: &[String], children: &BTreeSet<String>, out: &mut Source) {
    // The item being read is under `#[cfg(test)]`.
    let mut for_tests = false;
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            // Attributes, kept whole (clap's `env`).
            Tok::Punct('#') => {
                let at = if matches!(tokens.get(i + 1), Some(Tok::Punct('!'))) { i + 2 } else { i + 1 };
                if let Some(Tok::Group('[', inner)) = tokens.get(at) {
                    let attribute = words(inner).join(" ");
                    for_tests |= attribute == "cfg ( test )";
                    out.attributes.push(attribute);
                    i = at + 1;
                    continue;
                }
            }
            // An inline module: the file's tests are left out (not the code the map describes);
            // any other is read as the module it is.
            Tok::Ident(m) if m == "mod" => {
                if let (Some(Tok::Ident(name)), Some(Tok::Group('{', inner))) = (tokens.get(i + 1), tokens.get(i + 2)) {
                    if !for_tests {
                        let inner_module = [module, std::slice::from_ref(name)].concat();
                        walk_tokens(inner, &inner_module, &child_modules(inner), out);
                    }
                    for_tests = false;
                    i += 3;
                    continue;
                }
            }
            Tok::Ident(first) => {
                if first != "pub" {
                    for_tests = false;
                }
                let starts_path = matches!(first.as_str(), "crate" | "callrecon" | "super")
                    || (first == "self" || children.contains(first)) && is_path_sep(tokens, i + 1);
                if starts_path {
                    let base = match first.as_str() {
                        "crate" | "callrecon" => Vec::new(),
                        "super" => module[..module.len().saturating_sub(1)].to_vec(),
                        "self" => module.to_vec(),
                        child => [module, &[child.to_owned()]].concat(),
                    };
                    i = path_at(tokens, i + 1, base, &mut out.names);
                    continue;
                }
                out.idents.push(first.clone());
            }
            Tok::Lit(l) => {
                if let Some(text) = string_literal(l) {
                    out.literals.push(text);
                }
            }
            Tok::Group(_, inner) => walk_tokens(inner, module, children, out),
            Tok::Punct(_) => {}
        }
        i += 1;
    }
}

/// The identifiers and punctuation of `tokens`, groups flattened, as words.
fn words(tokens: &[Tok]) -> Vec<String> {
    tokens
        .iter()
        .flat_map(|t| match t {
            Tok::Ident(s) | Tok::Lit(s) => vec![s.clone()],
            Tok::Punct(c) => vec![c.to_string()],
            Tok::Group(_, inner) => words(inner),
        })
        .collect()
}

/// Whether `::` starts at `i`.
fn is_path_sep(tokens: &[Tok], i: usize) -> bool {
    matches!((tokens.get(i), tokens.get(i + 1)), (Some(Tok::Punct(':')), Some(Tok::Punct(':'))))
}

/// Reads the rest of a path from `i` (at `::` or past its end) onto `base`, expanding `{…}`
/// groups, and records each full path in `names`. Returns the index after it.
fn path_at(tokens: &[Tok], mut i: usize, mut base: Vec<String>, names: &mut Vec<Vec<String>>) -> usize {
    while is_path_sep(tokens, i) {
        match tokens.get(i + 2) {
            Some(Tok::Ident(id)) => {
                match id.as_str() {
                    "super" => {
                        base.pop();
                    }
                    "self" => {}
                    _ => base.push(id.clone()),
                }
                i += 3;
            }
            Some(Tok::Group('{', inner)) => {
                for item in inner.split(|t| matches!(t, Tok::Punct(','))) {
                    let Some(Tok::Ident(first)) = item.first() else { continue };
                    let mut path = base.clone();
                    if first != "self" {
                        path.push(first.clone());
                    }
                    path_at(item, 1, path, names);
                }
                return i + 3;
            }
            _ => break,
        }
    }
    names.push(base);
    i
}

/// The text of a string literal (`"…"`, `r"…"`, `r#"…"#`), lowercased with its whitespace (and
/// escaped newlines) collapsed; `None` for other literals.
fn string_literal(token: &str) -> Option<String> {
    let body = if let Some(raw) = token.strip_prefix('r') {
        raw.trim_matches('#').strip_prefix('"')?.strip_suffix('"')?.to_owned()
    } else {
        token.strip_prefix('"')?.strip_suffix('"')?.replace("\\n", " ").replace("\\\n", " ")
    };
    Some(body.to_lowercase().split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The file a module path names: the longest prefix of it that is a file of the crate.
fn file_of(path: &[String], files: &BTreeSet<String>) -> Option<String> {
    (1..=path.len()).rev().find_map(|n| {
        let p = path[..n].join("/");
        [format!("src/{p}.rs"), format!("src/{p}/mod.rs")].into_iter().find(|f| files.contains(f))
    })
}

/// Each file's imports: the other files of the crate it names.
fn imports(sources: &[Source]) -> BTreeMap<String, BTreeSet<String>> {
    let files: BTreeSet<String> = sources.iter().map(|s| s.path.clone()).collect();
    sources
        .iter()
        .map(|s| {
            let named = s.names.iter().filter_map(|n| file_of(n, &files)).filter(|f| *f != s.path).collect();
            (s.path.clone(), named)
        })
        .collect()
}

/// The top-level module a file is in (`src/decide/pages.rs` → `decide`).
fn top(path: &str) -> &str {
    path.trim_start_matches("src/").split(['/', '.']).next().unwrap()
}

/// The tables a literal writes: `insert into T`, `update T`, `delete from T`, `copy T … from
/// stdin`, `truncate T`, with any schema and quotes dropped; `{…}` for a table put in by
/// `format!`, which no check can read.
fn tables_written(sql: &str) -> Vec<String> {
    let words: Vec<&str> = sql.split([' ', '(', ',', ';']).filter(|w| !w.is_empty()).collect();
    let mut tables = Vec::new();
    for (k, w) in words.iter().enumerate() {
        let table = match (*w, words.get(k + 1), words.get(k + 2)) {
            ("insert" | "merge", Some(&"into"), Some(t)) => t,
            ("delete", Some(&"from"), Some(t)) => t,
            ("update" | "truncate", Some(t), _) if k == 0 || words[k - 1] != "for" && words[k - 1] != "do" => t,
            ("copy", Some(t), _) if sql.contains("from stdin") => t,
            _ => continue,
        };
        let table = table.trim_matches('"');
        let table = table.rsplit_once('.').map_or(table, |(_, t)| t).trim_matches('"');
        tables.push(if table.starts_with('{') || table.contains('{') { "{…}".to_owned() } else { table.to_owned() });
    }
    tables
}

/// Files writing each of `tables` (`{…}`: a table put in by `format!`), with the statement.
fn writers(sources: &[Source], tables: &[&str]) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    for s in sources {
        for sql in &s.literals {
            if tables_written(sql).iter().any(|t| tables.contains(&t.as_str())) {
                found.entry(s.path.clone()).or_insert_with(|| sql.clone());
            }
        }
    }
    found
}

/// Violations: files (other than `allowed`) writing `tables`.
fn written_elsewhere(sources: &[Source], tables: &[&str], allowed: impl Fn(&str) -> bool) -> Vec<String> {
    writers(sources, tables)
        .into_iter()
        .filter(|(path, _)| !allowed(path))
        .map(|(path, sql)| format!("{path} writes {tables:?}: {sql:?}"))
        .collect()
}

fn check_call_data_writers(sources: &[Source]) -> Vec<String> {
    // `apply/write.rs` writes `calls` or `call_groups` by name (`{table}`); the demo loads its
    // sample calls, `gen` writes the benchmark's.
    written_elsewhere(sources, &["calls", "call_groups"], |p| {
        ["src/apply/write.rs", "src/datagen.rs", "src/demo.rs"].contains(&p)
    })
}

/// A table put into a statement by `format!` cannot be checked: only apply's writer (`calls` or
/// `call_groups`) and the migrations (sqlx's table, in the schema given) do that.
fn check_dynamic_writes(sources: &[Source]) -> Vec<String> {
    written_elsewhere(sources, &["{…}"], |p| ["src/apply/write.rs", "src/db/migrate.rs"].contains(&p))
}

fn check_event_writers(sources: &[Source]) -> Vec<String> {
    let mut violations = written_elsewhere(sources, &["events", "event_history"], |p| p.starts_with("src/ledger/"));
    // The history is only appended to.
    for s in sources {
        for sql in &s.literals {
            let words: Vec<&str> = sql.split(' ').collect();
            let changes = words.windows(2).any(|w| {
                matches!(w, ["update", t] | ["from", t] | ["truncate", t] if t.trim_matches('"').ends_with("event_history"))
            }) && !sql.starts_with("select")
                && (sql.contains("update ") || sql.contains("delete ") || sql.contains("truncate "));
            if changes {
                violations.push(format!("{} changes event_history, which is only appended to: {sql:?}", s.path));
            }
        }
    }
    violations
}

/// Statements on `runs` outside `modules` (the runs store): reading, writing or joining it. A
/// query on events may join it for a run's kind or start (the ledger's history).
fn check_runs_statements(sources: &[Source], modules: &[&str]) -> Vec<String> {
    let mut violations = Vec::new();
    for s in sources.iter().filter(|s| !modules.contains(&s.path.as_str())) {
        for sql in &s.literals {
            let words: Vec<&str> = sql.split([' ', '(', ',']).collect();
            let on_runs = words.windows(2).any(|w| {
                let runs = w[1].rsplit('.').next() == Some("runs");
                runs && (matches!(w[0], "from" | "update" | "into")
                    || w[0] == "join" && !s.path.starts_with("src/ledger/"))
            });
            if on_runs {
                violations.push(format!("{} has a statement on runs outside {modules:?}: {sql:?}", s.path));
            }
        }
    }
    violations
}

fn check_conductor(sources: &[Source]) -> Vec<String> {
    let mut violations = Vec::new();
    for s in sources.iter().filter(|s| s.path == "src/run/mod.rs") {
        let sql = s.literals.iter().find(|l| {
            let first = l.split(' ').next().unwrap_or("");
            matches!(first, "select" | "insert" | "update" | "delete" | "copy" | "with" | "set" | "lock")
        });
        if let Some(sql) = sql {
            violations.push(format!("the conductor holds SQL: {sql:?}"));
        }
        let statements = ["query", "query_as", "query_scalar", "raw_sql", "copy_in_raw", "copy_out_raw"];
        for bad in statements.into_iter().chain(["spawn", "spawn_blocking", "JoinSet", "block_in_place"]) {
            if s.idents.iter().any(|i| i == bad) || s.names.iter().any(|n| n.iter().any(|p| p == bad)) {
                violations.push(format!("the conductor uses `{bad}`"));
            }
        }
    }
    // Only the drivers call it; `metrics` reads a run's `Finished`.
    let drivers = ["src/demo.rs", "src/main.rs", "src/metrics.rs", "src/resolve.rs", "src/schedule.rs"];
    for (path, named) in imports(sources) {
        if !path.starts_with("src/run/")
            && !drivers.contains(&path.as_str())
            && named.iter().any(|f| f.starts_with("src/run/"))
        {
            violations.push(format!("{path} calls the conductor"));
        }
    }
    violations
}

fn check_environment(sources: &[Source]) -> Vec<String> {
    let mut violations = Vec::new();
    for s in sources {
        let reads = s
            .idents
            .windows(2)
            .any(|w| w[0] == "env" && matches!(w[1].as_str(), "var" | "var_os" | "vars" | "vars_os"));
        if reads && s.path != "src/tuning.rs" {
            violations.push(format!("{} reads the environment; only tuning.rs does", s.path));
        }
        let clap_env = s.attributes.iter().any(|a| {
            let words: Vec<&str> = a.split([' ', ',', '(', ')']).filter(|w| !w.is_empty()).collect();
            matches!(words.first(), Some(&("arg" | "clap" | "command")))
                && words.windows(2).any(|w| w[0] == "env" && w[1] == "=")
        });
        if clap_env && s.path != "src/cli.rs" {
            violations.push(format!("{} reads the environment through clap; only cli.rs does", s.path));
        }
        let from_env = s.idents.windows(2).any(|w| w[0] == "Tuning" && w[1] == "from_env")
            || s.names.iter().any(|n| n.windows(2).any(|w| w[0] == "Tuning" && w[1] == "from_env"));
        if from_env && !["src/resolve.rs", "src/run/mod.rs", "src/suggest/mod.rs"].contains(&s.path.as_str()) {
            violations.push(format!("{} calls Tuning::from_env", s.path));
        }
    }
    violations
}

/// The stages in pipeline order: a stage may use what comes before it, never what comes after
/// or the conductor. `matching` is the decide stage's engine, so it comes first.
const STAGES: [&str; 5] = ["ingest", "matching", "decide", "apply", "report"];

fn check_stage_order(sources: &[Source]) -> Vec<String> {
    let mut violations = Vec::new();
    for (path, named) in imports(sources) {
        let Some(rank) = STAGES.iter().position(|m| *m == top(&path)) else { continue };
        for file in named {
            let target = top(&file);
            if target == "run" || STAGES[rank + 1..].contains(&target) {
                violations.push(format!("{path} imports {file}, a later stage or the conductor"));
            }
        }
    }
    violations
}

/// What the ledger (the record of matches, below every stage) may import.
const BELOW_THE_LEDGER: [&str; 9] =
    ["ledger", "decision", "tuning", "pgcopy", "progress", "event", "job", "db", "jsonb"];

fn check_ledger_below_stages(sources: &[Source]) -> Vec<String> {
    imports(sources)
        .into_iter()
        .filter(|(path, _)| path.starts_with("src/ledger/"))
        .flat_map(|(path, named)| {
            named
                .into_iter()
                .filter(|f| !BELOW_THE_LEDGER.contains(&top(f)))
                .map(move |f| format!("{path} imports {f}, above the ledger"))
        })
        .collect()
}

/// No two files import each other, directly or round a circle. A folder's `mod.rs` naming its
/// own files is its front door, not an import.
fn check_cycles(sources: &[Source]) -> Vec<String> {
    let graph: BTreeMap<String, BTreeSet<String>> = imports(sources)
        .into_iter()
        .map(|(path, named)| {
            // `src/db/mod.rs` and `src/db.rs` are both the front door of `src/db/`.
            let folder = match path.strip_suffix("mod.rs") {
                Some(dir) => dir.to_owned(),
                None => format!("{}/", path.trim_end_matches(".rs")),
            };
            let named = named.into_iter().filter(|f| !f.starts_with(folder.as_str())).collect();
            (path, named)
        })
        .collect();
    fn visit<'g>(
        f: &'g str,
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'g str>,
        done: &mut BTreeSet<&'g str>,
        found: &mut Vec<String>,
    ) {
        if done.contains(f) {
            return;
        }
        if let Some(at) = path.iter().position(|p| *p == f) {
            found.push(format!("files import each other in a circle: {}", [&path[at..], &[f]].concat().join(" -> ")));
            return;
        }
        path.push(f);
        for d in graph.get(f).into_iter().flatten() {
            visit(d, graph, path, done, found);
        }
        path.pop();
        done.insert(f);
    }
    let (mut done, mut found) = (BTreeSet::new(), Vec::new());
    for f in graph.keys() {
        visit(f, &graph, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

/// Every file named in ARCHITECTURE.md's code map, exactly: by its path, or by its name in the
/// section of its folder; and every file the map names exists.
fn check_code_map(sources: &[Source], map: &str) -> Vec<String> {
    let files: BTreeSet<String> = sources.iter().map(|s| s.path.clone()).collect();
    let mut named = BTreeSet::new();
    let mut violations = Vec::new();
    // Section by section (a heading and the text under it): the folders of the heading (those
    // it names, and those of the files it names), then the names in the section's text.
    let mut sections: Vec<(&str, String)> = vec![("", String::new())];
    for line in map.lines() {
        if line.starts_with('#') {
            sections.push((line, String::new()));
        } else {
            let text = &mut sections.last_mut().unwrap().1;
            text.push_str(line);
            text.push('\n');
        }
    }
    for (heading, text) in &sections {
        let folders: Vec<String> = heading
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|s| s.starts_with("src/"))
            .map(|s| if s.ends_with('/') { s.to_string() } else { format!("{}/", s.rsplit_once('/').unwrap().0) })
            .collect();
        let spans = heading.split('`').skip(1).step_by(2).chain(text.split('`').skip(1).step_by(2));
        for span in spans.filter(|s| s.ends_with(".rs") && !s.contains(char::is_whitespace) && !s.starts_with("tests/"))
        {
            // A name is read in the section's folders; one with a folder of its own
            // (`inbox/mod.rs`) also from `src/`, as is any name outside a folder's section.
            let candidates: Vec<String> = if span.starts_with("src/") {
                vec![span.to_string()]
            } else {
                let from_src = (span.contains('/') || folders.is_empty()).then(|| format!("src/{span}"));
                folders.iter().map(|d| format!("{d}{span}")).chain(from_src).collect()
            };
            match candidates.into_iter().find(|c| files.contains(c)) {
                Some(file) => {
                    named.insert(file);
                }
                None => violations.push(format!("ARCHITECTURE.md names `{span}`, which is not a file there")),
            }
        }
    }
    violations.extend(files.difference(&named).map(|f| format!("{f} is missing from ARCHITECTURE.md's code map")));
    violations
}

fn architecture() -> String {
    std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap()
}

/// The store holding every statement on `runs`.
const RUNS_MODULE: &[&str] = &["src/runs.rs"];

fn all_checks(sources: &[Source]) -> Vec<String> {
    [
        check_call_data_writers(sources),
        check_dynamic_writes(sources),
        check_event_writers(sources),
        check_runs_statements(sources, RUNS_MODULE),
        check_conductor(sources),
        check_environment(sources),
        check_stage_order(sources),
        check_ledger_below_stages(sources),
        check_cycles(sources),
        check_code_map(sources, &architecture()),
    ]
    .concat()
}

#[test]
fn the_code_keeps_the_architecture() {
    let violations = all_checks(&crate_sources());
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_architecture_fits_on_a_few_pages() {
    let lines = architecture().lines().count();
    assert!(lines <= 200, "ARCHITECTURE.md has {lines} lines (at most 200)");
}

/// Each check, shown a planted violation, reports it.
#[test]
fn each_check_sees_a_planted_violation() {
    fn caught(sources: Vec<Source>, check: impl Fn(&[Source]) -> Vec<String>, what: &str) {
        let found = check(&sources);
        assert!(found.iter().any(|v| v.contains(what)), "planted {what:?} not found: {found:?}");
    }
    // Writes, however spelled: schema-qualified, upper case, in a `format!`, a COPY.
    // An inline module is read too (only `#[cfg(test)]` ones are left out).
    caught(
        planted_line(
            "src/report/html.rs",
            r#"mod inner { const X: &str = "update calls set async_metadata = '{}'"; }"#,
        ),
        check_call_data_writers,
        "src/report/html.rs writes",
    );
    caught(
        planted_line("src/report/history.rs", r#"fn x() { sqlx::query("UPDATE public.calls SET x = 1"); }"#),
        check_call_data_writers,
        "src/report/history.rs writes",
    );
    caught(
        planted_line("src/verify.rs", r#"fn x(t: &str) { format!("update {t} set async_metadata = '{{}}'"); }"#),
        check_dynamic_writes,
        "src/verify.rs writes",
    );
    caught(
        planted_line("src/apply/read.rs", r#"const X: &str = "delete from callrecon.events where id = $1";"#),
        check_event_writers,
        "src/apply/read.rs writes",
    );
    caught(
        planted_line(
            "src/report/unmatched.rs",
            r##"const X: &str = r#"copy events (id) from stdin (format binary)"#;"##,
        ),
        check_event_writers,
        "src/report/unmatched.rs writes",
    );
    caught(
        planted_line("src/ledger/history.rs", r#"const X: &str = "update event_history set by_person = null";"#),
        check_event_writers,
        "only appended to",
    );
    caught(
        planted_line("src/report/html.rs", r#"const X: &str = "select id from runs where job = $1";"#),
        |s| check_runs_statements(s, RUNS_MODULE),
        "statement on runs",
    );
    // The conductor: SQL, a spawned task.
    caught(
        planted_line(
            "src/run/mod.rs",
            r#"async fn x(c: &mut sqlx::PgConnection) { sqlx::query("select 1").execute(c).await.ok(); }"#,
        ),
        check_conductor,
        "holds SQL",
    );
    caught(planted_line("src/run/mod.rs", "fn x() { tokio::spawn(async {}); }"), check_conductor, "`spawn`");
    caught(
        planted_line("src/report/html.rs", "fn x() { let _ = crate::run::Mode::Run; }"),
        check_conductor,
        "src/report/html.rs calls the conductor",
    );
    // The environment: a variable, clap's `env`, the tuning's reader.
    caught(
        planted_line("src/job.rs", r#"fn x() { std::env::var_os("HOME"); }"#),
        check_environment,
        "src/job.rs reads the environment",
    );
    caught(
        planted_line("src/serve/mod.rs", "#[derive(clap::Args)] struct X { #[arg(long, env = \"X\")] x: String }"),
        check_environment,
        "through clap",
    );
    caught(
        planted_line("src/apply/mod.rs", "fn x() { crate::tuning::Tuning::from_env(); }"),
        check_environment,
        "Tuning::from_env",
    );
    // Imports: a grouped `use`, a later stage, above the ledger, a circle.
    caught(
        planted_line("src/ingest/queue.rs", "use crate::{db, report::{self, Report}};"),
        check_stage_order,
        "src/ingest/queue.rs imports src/report",
    );
    caught(
        planted_line("src/ledger/part.rs", "use crate::{decision, matching::engine::EventIn};"),
        check_ledger_below_stages,
        "above the ledger",
    );
    caught(planted_line("src/decision.rs", "use crate::decide::Stage;"), check_cycles, "circle");
    caught(planted_line("src/apply/types.rs", "fn x() { let _ = super::merge::call_value; }"), check_cycles, "circle");
    // The map: a file it does not name, a name that is not a file.
    caught(
        planted("src/decide/extra.rs", "pub fn x() {}"),
        |s| check_code_map(s, &architecture()),
        "src/decide/extra.rs is missing",
    );
    let renamed = architecture().replace("`pages.rs`", "`page.rs`");
    caught(crate_sources(), |s| check_code_map(s, &renamed), "`page.rs`");
}

/// Every page goes through its templates' autoescaping; nothing is marked safe.
#[test]
fn pages_are_rendered_only_through_autoescaping_templates() {
    for s in crate_sources() {
        let bypass = s.idents.iter().any(|i| i == "from_safe_string" || i == "from_safe");
        assert!(!bypass, "{} marks a value safe", s.path);
    }
    for dir in ["src/serve/review/templates", "src/report/templates"] {
        for entry in std::fs::read_dir(root().join(dir)).unwrap() {
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
