// Rebuild when a migration changes: `sqlx::migrate!` embeds sql/ at compile time. And the commit
// `callrecon --version` names: `git rev-parse`, or CALLRECON_COMMIT when building outside a git
// checkout (a source tarball), else "unknown".
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-changed=sql");
    println!("cargo:rerun-if-env-changed=CALLRECON_COMMIT");
    let commit = std::env::var("CALLRECON_COMMIT")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=CALLRECON_COMMIT={commit}");
    // A new commit moves HEAD or the branch it names (a worktree has a HEAD of its own; refs live
    // in the common directory): rerun then, and only then.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]).filter(|p| std::path::Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
