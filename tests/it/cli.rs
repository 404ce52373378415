//! The command line explains itself: every command and option says what it does, a command's
//! help shows its own options before the global ones, `users add` names the roles it needs,
//! `--version` names the commit, and a refused connection names the URL it used (without its
//! password) and how to give another.

use std::process::{Command, Output};

use clap::CommandFactory;

use crate::helpers::*;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_callrecon")).args(args).env_remove("DATABASE_URL").output().unwrap()
}

#[test]
fn every_command_and_option_says_what_it_does() {
    fn visit(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        if cmd.get_about().is_none() {
            missing.push(format!("command `{path}`"));
        }
        for arg in cmd.get_arguments() {
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("`{path}` argument {}", arg.get_id()));
            }
            for value in arg.get_possible_values().iter().filter(|_| arg.get_value_parser().possible_values().is_some())
            {
                // Enumerated values (--format text|json, --log-format, --groups, ...) say what each is;
                // fixed lists of names (the roles) are described by their option.
                if value.get_help().is_none() && arg.get_id() != "roles" {
                    missing.push(format!("`{path}` {} value {}", arg.get_id(), value.get_name()));
                }
            }
        }
        for sub in cmd.get_subcommands() {
            visit(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
    let mut cli = callrecon::cli::Cli::command();
    cli.build();
    let mut missing = Vec::new();
    visit(&cli, "callrecon", &mut missing);
    assert!(missing.is_empty(), "without a description: {missing:#?}");
}

#[test]
fn a_commands_help_lists_its_own_options_before_the_global_ones() {
    for (command, own) in [(&["run"][..], "--job"), (&["report", "show"][..], "--format"), (&["serve"][..], "--listen")]
    {
        let out = run(&[command, &["--help"]].concat());
        assert!(out.status.success(), "{}", stderr(&out));
        let help = stdout(&out);
        let at = |s: &str| help.find(s).unwrap_or_else(|| panic!("{s} in {help}"));
        assert!(at(own) < at("Global options:"), "{help}");
        assert!(at("Global options:") < at("--database-url"), "{help}");
    }
}

#[test]
fn users_add_without_a_role_is_refused_naming_the_roles() {
    let out = run(&["users", "add", "ana"]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("--role <AsyncMetaData|Analyst>"), "{err}");
}

#[test]
fn version_names_the_commit_it_was_built_from() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    let text = stdout(&out);
    let commit = text
        .trim()
        .strip_prefix(&format!("callrecon {} (commit ", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{text}"));
    // Built from this checkout: build.rs reruns when HEAD moves, so the test's binary names HEAD.
    let head = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().unwrap();
    if head.status.success() {
        assert_eq!(commit, String::from_utf8_lossy(&head.stdout).trim(), "{text}");
    } else {
        assert_eq!(commit, "unknown", "{text}");
    }
}

#[test]
fn a_refused_connection_names_the_url_without_its_password_and_how_to_give_another() {
    let server = url::Url::parse(&std::env::var("DATABASE_URL").expect("scripts/test.sh sets DATABASE_URL")).unwrap();
    let mut url = server.clone();
    url.set_username("callrecon_no_such_role").unwrap();
    url.set_password(Some("s3cret-pw")).unwrap();
    url.set_path("/callrecon_nowhere");
    let out = run(&["--database-url", url.as_str(), "migrate"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let shown = url.as_str().replace("s3cret-pw", "***");
    assert!(
        err.contains(&format!("cannot reach PostgreSQL at {shown} (set DATABASE_URL or --database-url to postgres://")),
        "{err}"
    );
    assert!(err.contains("role \"callrecon_no_such_role\" does not exist"), "{err}");
    assert!(!err.contains("s3cret-pw"), "{err}");
}
