//! The `callrecon` binary: parse arguments, set up logs, run a command, map errors to exit codes.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use callrecon::cli::{Cli, Command, GenCommand, LogFormat, ReportCommand, UsersCommand};
use callrecon::job::{self, JobError};
use callrecon::run::{self, AlreadyRunning, Mode};
use callrecon::{datagen, db, demo, event, ingest, inspect, report, serve, users, verify};

/// Exit status when the job file is refused.
const EXIT_BAD_JOB: u8 = 2;
/// Exit status when another run of the job holds its lock.
const EXIT_LOCKED: u8 = 3;
/// Exit status of `verify` when rows differ from the record of matches and were not repaired.
const EXIT_DIFFERENCES: u8 = 4;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    db::set_timeouts(db::Timeouts {
        connect: cli.connect_timeout,
        statement: cli.statement_timeout,
        lock: cli.lock_timeout,
    });
    db::set_schemas(db::Schemas { own: cli.schema.clone(), platform: cli.platform_schema.clone() });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: what went wrong and, through the context chain, where.
            eprintln!("callrecon: error: {}", db::error_line(&e));
            if e.downcast_ref::<JobError>().is_some() {
                ExitCode::from(EXIT_BAD_JOB)
            } else if e.downcast_ref::<AlreadyRunning>().is_some() {
                ExitCode::from(EXIT_LOCKED)
            } else if e.downcast_ref::<verify::Unrepaired>().is_some() {
                ExitCode::from(EXIT_DIFFERENCES)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "callrecon=info,warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.compact().without_time().with_target(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn dispatch(cli: Cli) -> Result<()> {
    // Job files are checked before anything touches the database.
    let job = match &cli.command {
        Command::Run { job, .. }
        | Command::Rematch { job, .. }
        | Command::Explain { job, .. }
        | Command::Demo { job, .. }
        | Command::Verify { job: Some(job), .. } => Some(job::load(job)?),
        _ => None,
    };
    if let Command::Schedule { jobs } = &cli.command {
        // Long-running: connects (and reconnects) to the database itself.
        return callrecon::schedule::daemon(&cli.database_url, jobs).await;
    }
    if let Command::Grants { role } = &cli.command {
        print!("{}", db::grants(&db::schemas(), role));
        return Ok(());
    }
    let pool = db::connect(&cli.database_url).await?;
    match cli.command {
        Command::Schedule { .. } | Command::Grants { .. } => unreachable!("handled above"),
        Command::Migrate => println!("database is up to date ({} migrations)", db::MIGRATOR.iter().count()),
        Command::Run { dry_run, .. } => {
            let job = job.expect("loaded above");
            let done = run::execute(&pool, &job, Mode::Run, dry_run).await?;
            print_finished(&done);
        }
        Command::Rematch { since, until, dry_run, .. } => {
            let job = job.expect("loaded above");
            let time = |flag: &str, v: Option<String>| -> Result<_> {
                v.map(|s| {
                    event::parse_time(&s, job.timezone)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("--{flag} {s:?}"))
                })
                .transpose()
            };
            let mode = Mode::Rematch { since: time("since", since)?, until: time("until", until)? };
            let done = run::execute(&pool, &job, mode, dry_run).await?;
            print_finished(&done);
        }
        Command::Explain { event_id, .. } => {
            print!("{}", inspect::explain_event(&pool, &job.expect("loaded above"), event_id).await?);
        }
        Command::Verify { repair, .. } => {
            let verified = verify::verify(&pool, job.as_ref().map(|j| j.name.as_str()), repair).await?;
            print!("{}", verify::text(&verified));
            if verified.differs() && !repair {
                return Err(
                    verify::Unrepaired { calls: verified.calls_differing, groups: verified.groups_differing }.into()
                );
            }
        }
        Command::Enqueue { files } => enqueue(&pool, &files).await?,
        Command::Gen { command } => {
            let scale = |s: &callrecon::cli::GenScale| datagen::Scale {
                calls: s.calls,
                days: s.days,
                until: s.until,
                seed: s.seed,
                groups: s.groups,
            };
            let mut conn = pool.acquire().await?;
            match command {
                GenCommand::Calls { scale: s } => {
                    let n = datagen::calls(&mut conn, &scale(&s)).await?;
                    println!("generated {n} calls and {} call groups", scale(&s).groups().count());
                }
                GenCommand::Events { scale: s, from, to, count, salt } => {
                    let n = datagen::events(&mut conn, &scale(&s), from, to, count, salt).await?;
                    println!("queued {n} events about calls from {from} to {to}");
                }
            }
        }
        Command::Report { command: ReportCommand::List { job, limit } } => {
            print!("{}", report::history::list(&pool, job.as_deref(), limit).await?);
        }
        Command::Report { command: ReportCommand::Show { run, format } } => {
            report::history::show(&pool, run, format, &mut std::io::stdout().lock()).await?;
        }
        Command::Demo { samples, .. } => {
            let job = job.expect("loaded above");
            let runs = demo::demo(&pool, &samples, &job).await?;
            let last = runs.last().expect("demo runs");
            println!("\nOpen the report in a browser: {}", last.dir.join("report.html").display());
        }
        Command::Serve(args) => serve::run(&pool, &args).await?,
        Command::Users { command: UsersCommand::Add { name, roles } } => {
            print!("{}", users::created_text(&users::add(&pool, &name, &roles).await?));
        }
        Command::Users { command: UsersCommand::List } => print!("{}", users::list_text(&users::list(&pool).await?)),
        Command::Users { command: UsersCommand::Revoke { name } } => {
            users::revoke(&pool, &name).await?;
            println!("revoked API user {name}: its secret and tokens no longer work");
        }
    }
    Ok(())
}

/// A finished run's summary on stdout; what failed after it committed on stderr (the exit status
/// stays 0: the run's changes are kept).
fn print_finished(done: &run::Finished) {
    println!("{}", report::history::summary_text(&done.report, &done.dir));
    for problem in &done.problems {
        eprintln!("callrecon: warning: the run committed (its changes are kept), but {problem}");
    }
}

/// Enqueues every readable record of the files; records that cannot be read are listed and make
/// the exit status non-zero, after the others are on the queue.
async fn enqueue(pool: &sqlx::PgPool, files: &[std::path::PathBuf]) -> Result<()> {
    let (payloads, unreadable) = ingest::inbox::payloads_of(files)?;
    let n = ingest::queue::enqueue(&mut *pool.acquire().await?, &payloads).await?;
    println!("enqueued {n} events");
    if !unreadable.is_empty() {
        for u in &unreadable {
            eprintln!("not enqueued: {u}");
        }
        anyhow::bail!("{} records could not be read and were not enqueued", unreadable.len());
    }
    Ok(())
}
