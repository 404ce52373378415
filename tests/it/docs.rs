//! The docs cannot go stale: every command and flag they name is in the CLI, every job file and
//! repository file they name exists, every link and anchor resolves, every `CALLRECON_*`
//! variable is read somewhere, the README lists every command, and the demo's output they quote
//! (blocks marked `<!-- checked: NAME -->`, and samples/README.md's figures) is what the demo
//! prints.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use sqlx::PgPool;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The user-facing docs: (path relative to the root, text).
fn docs() -> Vec<(String, String)> {
    let mut paths: Vec<String> =
        ["README.md", "CHANGELOG.md", "samples/README.md", "bench/README.md"].iter().map(|s| s.to_string()).collect();
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            paths.push(format!("docs/{}", path.file_name().unwrap().to_string_lossy()));
        }
    }
    paths.sort();
    paths.into_iter().map(|p| (p.clone(), std::fs::read_to_string(root().join(&p)).unwrap())).collect()
}

/// Inline code spans (outside fenced blocks; a span may cross a line break) and the lines of
/// fenced blocks, each with its line.
fn code(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    // Prose with the fenced blocks' lines blanked, so that line numbers stay as they are.
    let mut prose = String::new();
    let mut fenced = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if fenced {
            out.push((i + 1, line.to_owned()));
        } else {
            prose += line;
        }
        prose.push('\n');
    }
    let mut at = 0;
    while let Some(start) = prose[at..].find('`').map(|s| s + at) {
        let ticks = prose[start..].chars().take_while(|c| *c == '`').count();
        let from = start + ticks;
        let Some(end) = prose[from..].find(&"`".repeat(ticks)).map(|e| e + from) else { break };
        let line = prose[..start].matches('\n').count() + 1;
        out.push((line, prose[from..end].replace('\n', " ")));
        at = end + ticks;
    }
    out
}

/// The words of a command line, without the brackets and quotes docs put around optional parts.
fn words(line: &str) -> Vec<String> {
    line.replace("\\|", " | ")
        .split_whitespace()
        .map(|w| w.trim_matches(|c| matches!(c, '[' | ']' | '(' | ')' | '"' | '\'' | ',' | '…')).to_owned())
        .filter(|w| !w.is_empty())
        .collect()
}

fn long_names(cmd: &clap::Command) -> BTreeSet<String> {
    cmd.get_arguments().filter_map(|a| a.get_long().map(str::to_owned)).chain(["help".to_owned()]).collect()
}

fn takes_value(cmd: &clap::Command, long: &str) -> bool {
    cmd.get_arguments().any(|a| a.get_long() == Some(long) && a.get_action().takes_values())
}

/// Checks one command line starting at `words[0]`, a subcommand of callrecon (global options
/// before it already skipped); returns what is wrong.
fn check_invocation(cli: &clap::Command, globals: &BTreeSet<String>, words: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(mut cmd) = cli.find_subcommand(&words[0]) else {
        return vec![format!("no command `{}`", words[0])];
    };
    let mut path = words[0].clone();
    let mut rest = &words[1..];
    if cmd.has_subcommands() {
        if let Some(sub) = rest.first().and_then(|w| cmd.find_subcommand(w)) {
            path = format!("{path} {}", rest[0]);
            cmd = sub;
            rest = &rest[1..];
        } else if let Some(w) = rest.first().filter(|w| w.chars().all(|c| c.is_ascii_lowercase())) {
            problems.push(format!("no command `{path} {w}`"));
        }
    }
    for w in rest {
        if ["|", "&&", ";", "#", ">", "<", "2>&1"].contains(&w.as_str()) {
            break;
        }
        if let Some(flag) = w.strip_prefix("--") {
            let flag = flag.split('=').next().unwrap();
            if !flag.is_empty() && !long_names(cmd).contains(flag) && !globals.contains(flag) {
                problems.push(format!("`{path}` has no option --{flag}"));
            }
        }
    }
    problems
}

/// Every place the docs run callrecon: `callrecon ...` (or a path ending in `/callrecon`), and
/// code spans that start with a command's name and name an option (`run --job FILE`).
#[test]
fn every_command_and_option_the_docs_name_exists() {
    let cli = callrecon::cli::Cli::command();
    let globals: BTreeSet<String> =
        cli.get_arguments().filter(|a| a.is_global_set()).filter_map(|a| a.get_long().map(str::to_owned)).collect();
    let every_long: BTreeSet<String> = std::iter::once(&cli)
        .chain(cli.get_subcommands())
        .chain(cli.get_subcommands().flat_map(|s| s.get_subcommands()))
        .flat_map(long_names)
        .collect();
    let mut problems = Vec::new();
    for (file, text) in docs() {
        for (line, snippet) in code(&text) {
            let w = words(&snippet);
            let mut at = |p: String| problems.push(format!("{file}:{line}: {p} (in `{snippet}`)"));
            // Comments aside; callrecon where a shell would run it.
            let w: Vec<String> = w.into_iter().take_while(|x| x != "#").collect();
            let command_at = |i: usize| {
                (w[i] == "callrecon" || w[i].ends_with("/callrecon"))
                    && (i == 0 || ["$", "|", "&&", ";", "sudo", "exec"].contains(&w[i - 1].as_str()))
            };
            if let Some(i) = (0..w.len()).find(|i| command_at(*i)) {
                // Global options, then the command.
                let mut j = i + 1;
                while j < w.len() && w[j].starts_with("--") {
                    let flag = w[j][2..].split('=').next().unwrap().to_owned();
                    if !globals.contains(&flag) && flag != "version" && flag != "help" {
                        at(format!("--{flag} is not a global option"));
                    }
                    j += if takes_value(&cli, &flag) && !w[j].contains('=') { 2 } else { 1 };
                }
                if j < w.len() && w[j].chars().all(|c| c.is_ascii_lowercase() || c == '-') && w[j] != "help" {
                    check_invocation(&cli, &globals, &w[j..]).into_iter().for_each(&mut at);
                }
            } else if w.len() > 1
                && cli.find_subcommand(&w[0]).is_some()
                && w.iter().any(|x| x.starts_with("--"))
                && !snippet.contains('=')
            {
                check_invocation(&cli, &globals, &w).into_iter().for_each(&mut at);
            } else if snippet.starts_with("--") && !snippet.contains(' ') || snippet.starts_with("--") && w.len() == 2 {
                let flag = w[0][2..].split('=').next().unwrap();
                if !every_long.contains(flag) {
                    at(format!("no command has an option --{flag}"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "the docs name commands or options that do not exist:\n{}", problems.join("\n"));
}

/// The README lists every command (hidden ones aside), each as `callrecon NAME`.
#[test]
fn the_readme_lists_every_command() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let cli = callrecon::cli::Cli::command();
    let mut missing = Vec::new();
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_name();
        if !readme.contains(&format!("`callrecon {name}")) {
            missing.push(name.to_owned());
        }
        for inner in sub.get_subcommands().filter(|s| !s.is_hide_set()) {
            if !readme.contains(&format!("{name} {}", inner.get_name())) {
                missing.push(format!("{name} {}", inner.get_name()));
            }
        }
    }
    assert!(missing.is_empty(), "README.md's list of commands leaves out {missing:?}");
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// Markdown links `[text](target)` of a text, with their line.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            out.push((i + 1, after[..end].to_owned()));
            rest = &after[end..];
        }
    }
    out
}

/// Files of the repository a doc names: in a link, or as a code span such as `scripts/demo.sh`;
/// and every `jobs/*.toml` it names anywhere (absolute paths, an installation's, aside).
#[test]
fn every_file_link_and_anchor_the_docs_name_exists() {
    const TOP: [&str; 10] =
        ["jobs/", "docs/", "scripts/", "bench/", "samples/", "sql/", "src/", "tests/", "examples/", ".ci/"];
    let mut problems = Vec::new();
    for (file, text) in docs() {
        let dir = Path::new(&file).parent().unwrap().to_owned();
        for (line, target) in links(&text) {
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let (path, anchor) = target.split_once('#').map_or((target.as_str(), None), |(p, a)| (p, Some(a)));
            let resolved: PathBuf = if path.is_empty() { PathBuf::from(&file) } else { dir.join(path) };
            let full = root().join(&resolved);
            if !full.exists() {
                problems.push(format!("{file}:{line}: link to {target}: no {}", resolved.display()));
                continue;
            }
            if let Some(anchor) = anchor {
                let target_text = std::fs::read_to_string(&full).unwrap_or_default();
                if !anchors(&target_text).contains(anchor) {
                    problems.push(format!("{file}:{line}: link to {target}: no heading #{anchor} there"));
                }
            }
        }
        for (line, snippet) in code(&text) {
            for w in words(&snippet) {
                let w = w.trim_end_matches(['.', ':', ';']);
                let named = TOP.iter().any(|t| w.starts_with(t)) && !w.contains(['*', '<', '{', '$'])
                    // What the demo and the runs create, not part of the repository.
                    && !w.starts_with("jobs/demo/");
                if named && !root().join(w).exists() {
                    problems.push(format!("{file}:{line}: `{w}` is not in the repository"));
                }
            }
        }
        for (i, l) in text.lines().enumerate() {
            for (at, _) in l.match_indices("jobs/") {
                let name: String =
                    l[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || "/._-".contains(*c)).collect();
                let absolute = l[..at].ends_with('/');
                if name.ends_with(".toml") && !absolute && !root().join(&name).exists() {
                    problems.push(format!("{file}:{}: {name} does not exist", i + 1));
                }
            }
        }
    }
    assert!(problems.is_empty(), "the docs name files or anchors that do not exist:\n{}", problems.join("\n"));
}

/// Every `CALLRECON_*` variable the docs name is read by the code (or the scripts).
#[test]
fn every_variable_the_docs_name_is_read() {
    let mut sources = String::new();
    for dir in ["src", "scripts", "bench"] {
        for entry in walk(&root().join(dir)) {
            sources += &std::fs::read_to_string(entry).unwrap_or_default();
        }
    }
    let mut missing = BTreeSet::new();
    for (file, text) in docs() {
        for (at, _) in text.match_indices("CALLRECON_") {
            let name: String =
                text[at..].chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect();
            if name.len() > "CALLRECON_".len() && !sources.contains(&name) {
                missing.insert(format!("{file}: {name}"));
            }
        }
    }
    assert!(missing.is_empty(), "the docs name variables nothing reads: {missing:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The fenced blocks marked `<!-- checked: NAME -->` in the docs, by name: (file, block) each.
fn checked_blocks() -> BTreeMap<String, Vec<(String, String)>> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (file, text) in docs() {
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            let Some(name) = line.trim().strip_prefix("<!-- checked: ") else { continue };
            let name = name.split(" (").next().unwrap().trim_end_matches(" -->").trim().to_owned();
            assert!(lines.next().is_some_and(|l| l.starts_with("```")), "{file}: a fenced block after {line}");
            let block: Vec<&str> = lines.by_ref().take_while(|l| !l.starts_with("```")).collect();
            out.entry(name).or_default().push((file.clone(), block.join("\n")));
        }
    }
    out
}

/// Output as the docs show it: a run's time as `0.00s`, the test's job folder as `jobs`.
fn normalised(text: &str, job_dir: &Path) -> String {
    text.trim()
        .replace(&job_dir.display().to_string(), "jobs")
        .lines()
        .map(|l| match (l.strip_prefix("callrecon: job "), l.rfind(" in "), l.rfind('s')) {
            (Some(_), Some(at), Some(end)) if end > at && l[at + 4..end].parse::<f64>().is_ok() => {
                format!("{} in 0.00s{}", &l[..at], &l[end + 1..])
            }
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The demo's first and second run as the docs quote them, `explain` of the event the README
/// names, the rematch after the README's rule change, and samples/README.md's figures.
#[sqlx::test(migrator = "MIGRATOR")]
async fn the_demo_output_the_docs_quote_is_what_it_prints(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("demo.toml");
    std::fs::copy(root().join("jobs/demo.toml"), &job).unwrap();
    let job_arg = job.to_str().unwrap();
    let samples = root().join("samples");
    let out = callrecon(&pool, &["demo", "--samples", samples.to_str().unwrap(), "--job", job_arg]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let demo = stdout(&out);
    let runs: Vec<&str> = demo.split("\n== ").filter(|part| part.contains("callrecon: job demo")).collect();
    assert_eq!(runs.len(), 2, "{demo}");
    let summary = |part: &str| {
        let from = part.find("callrecon: job demo").unwrap();
        let to = part[from..].find("report.html").unwrap() + from + "report.html".len();
        normalised(&part[from..to], dir.path())
    };
    let mut actual = BTreeMap::new();
    actual.insert("demo first run", summary(runs[0]));
    actual.insert("demo second run", summary(runs[1]));

    // The event the README explains: the first of the demo's ambiguous events.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let explained: i64 = readme
        .lines()
        .find_map(|l| l.strip_prefix("callrecon explain --job jobs/demo.toml "))
        .expect("README explains an event")
        .trim()
        .parse()
        .unwrap();
    let ambiguous: Vec<i64> = sqlx::query_scalar("select id from events where reason = 'ambiguous' order by id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        ambiguous.first(),
        Some(&explained),
        "README explains event {explained}; the ambiguous ones: {ambiguous:?}"
    );
    let out = callrecon(&pool, &["explain", "--job", job_arg, &explained.to_string()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    actual.insert("demo explain", normalised(&stdout(&out), dir.path()));
    assert!(demo.contains(&format!("callrecon explain --job {job_arg} {explained} ")), "{demo}");

    // The README's rule change, made as its `sed` line says, then the rematch's dry run.
    let sed = readme.lines().find_map(|l| l.strip_prefix("sed -i 's/")).expect("README's sed line");
    let mut parts = sed.split('/');
    let (from, to) = (parts.next().unwrap(), parts.next().unwrap());
    let text = std::fs::read_to_string(&job).unwrap();
    assert!(text.contains(from), "jobs/demo.toml has no {from:?} for the README's sed line");
    std::fs::write(&job, text.replace(from, to)).unwrap();
    let out = callrecon(&pool, &["rematch", "--job", job_arg, "--dry-run"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    actual.insert("demo rematch", normalised(&stdout(&out), dir.path()));

    let blocks = checked_blocks();
    for (name, output) in &actual {
        let quoted = blocks.get(*name).unwrap_or_else(|| panic!("no doc quotes `{name}`"));
        for (file, block) in quoted {
            assert_eq!(&normalised(block, dir.path()), output, "{file}'s `{name}` block is not what the demo prints");
        }
    }
    let unknown: Vec<&String> = blocks.keys().filter(|k| !actual.contains_key(k.as_str())).collect();
    assert!(unknown.is_empty(), "checked blocks this test does not know: {unknown:?}");

    // samples/README.md: what the demo queues, rejects and ingests.
    let samples_readme = std::fs::read_to_string(root().join("samples/README.md")).unwrap();
    let number_after = |text: &str, before: &str| -> u64 {
        let at = text.find(before).unwrap_or_else(|| panic!("{before:?} in {text}")) + before.len();
        text[at..].split_whitespace().next().unwrap().parse().unwrap()
    };
    let first = sqlx::query_scalar::<_, sqlx::types::Json<callrecon::report::Summary>>(
        "select summary from runs order by id limit 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap()
    .0;
    let prose = samples_readme.split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(number_after(&prose, "the demo queues "), number_after(&demo, "queued "));
    assert_eq!(number_after(&prose, "its first run reports "), first.rejected);
    assert_eq!(number_after(&prose, "It ingests the "), first.ingested);
}
