//! The `callrecon` binary: parse arguments, set up logs, run a command, map errors to exit codes.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use callrecon::cli::{Cli, Command, GenCommand, HistoryFormat, LogFormat, ReportCommand, UsersCommand};
use callrecon::job::{self, JobError};
use callrecon::run::{self, AlreadyRunning, Mode};
use callrecon::{
    datagen, db, demo, event, ingest, inspect, metrics, report, resolve, serve, suggest, tuning, users, verify,
};

/// mimalloc rather than glibc's allocator: a rematch of 5M calls spent a sixth of its own CPU
/// time in malloc and free (bench/RESULTS.md, "the rematch's own CPU").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process. mimalloc asks for them (`MADV_HUGEPAGE`)
/// on the memory it maps, and where the kernel grants them to such memory on a fault
/// (`enabled` and `defrag` at `madvise`, as on the machine bench/RESULTS.md was measured on) each
/// first touch compacts and zeroes 2 MiB: a rematch of 5M calls spent 3.4 s in the kernel that
/// way against 1.2 s without, beside 2.6 s of its own work ("huge pages" there). What
/// `MIMALLOC_ALLOW_THP=0` does, without asking operators to set it.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE takes no pointers and only sets a flag on this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// A one-shot command keeps freed memory mapped for [`tuning::PURGE_DELAY_MS`] rather than
/// mimalloc's second, so a rematch's next chunk reuses the pages the last one freed.
fn keep_freed_memory(command: &Command) {
    if matches!(command, Command::Serve(_) | Command::Schedule { .. }) {
        return;
    }
    if let Some(ms) = tuning::purge_delay_ms() {
        // mimalloc's `mi_option_purge_delay` (its option 15 in v3, include/mimalloc.h); the Rust
        // bindings name only some options.
        const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
        unsafe extern "C" {
            fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
        }
        // SAFETY: sets one of mimalloc's options, a plain integer it reads when it next purges.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, ms as std::ffi::c_long) };
    }
}

/// Exit status when the job file is refused.
const EXIT_BAD_JOB: u8 = 2;
/// Exit status when another run of the job holds its lock.
const EXIT_LOCKED: u8 = 3;
/// Exit status of `verify` when rows differ from the record of matches and were not repaired.
const EXIT_DIFFERENCES: u8 = 4;

fn main() -> ExitCode {
    no_huge_pages();
    let cli = Cli::parse();
    keep_freed_memory(&cli.command);
    init_tracing(cli.log_format);
    db::set_timeouts(db::Timeouts {
        connect: cli.connect_timeout,
        statement: cli.statement_timeout,
        lock: cli.lock_timeout,
    });
    db::set_schemas(db::Schemas { own: cli.schema.clone(), platform: cli.platform_schema.clone() });
    db::set_pooler(cli.pooler);
    db::set_auto_migrate(!cli.no_migrate || matches!(cli.command, Command::Migrate));
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
    let job = job_of(&cli.command)?;
    if db::pooler() == db::Pooler::Transaction {
        refuse_without_session(&cli.command)?;
    }
    if let Some(done) = without_database(&cli).await {
        return done;
    }
    let pool = match db::connect(&cli.database_url).await {
        Ok(pool) => pool,
        Err(e) => {
            if let (Command::Run { metrics_file: Some(path), .. }, Some(job)) = (&cli.command, &job) {
                // The textfile still tells the collector that this run failed.
                write_metrics_file(path, &job.name, &metrics::Ended::Failed(&e), None).await;
            }
            return Err(e);
        }
    };
    with_database(&pool, job, cli).await
}

/// The job file the command names, loaded (and refused) first.
fn job_of(command: &Command) -> Result<Option<job::Job>> {
    Ok(match command {
        Command::Run { job, .. }
        | Command::Rematch { job, .. }
        | Command::Explain { job, .. }
        | Command::Resolve { job, .. }
        | Command::Reopen { job, .. }
        | Command::Undo { job: Some(job), .. }
        | Command::Demo { job, .. }
        | Command::Verify { job: Some(job), .. }
        | Command::Suggest { job, .. } => Some(job::load(job)?),
        _ => None,
    })
}

/// The commands that need no connection of the command's own: `schedule` (long-running, it
/// connects and reconnects itself), `grants` and `generate-docs`. `None`: another command.
async fn without_database(cli: &Cli) -> Option<Result<()>> {
    match &cli.command {
        Command::Schedule { jobs, metrics_listen } => {
            Some(callrecon::schedule::daemon(&cli.database_url, jobs, *metrics_listen).await)
        }
        Command::Grants { role } => {
            print!("{}", db::grants(&db::schemas(), role));
            Some(Ok(()))
        }
        Command::GenerateDocs { dir } => {
            Some(callrecon::cli::generate_docs(dir).with_context(|| format!("writing into {}", dir.display())))
        }
        _ => None,
    }
}

/// Every other command, on the database connected to; `job`: the one the command names.
async fn with_database(pool: &sqlx::PgPool, job: Option<job::Job>, cli: Cli) -> Result<()> {
    match cli.command {
        Command::Schedule { .. } | Command::Grants { .. } | Command::GenerateDocs { .. } => {
            unreachable!("handled above")
        }
        Command::Migrate => println!("database is up to date ({} migrations)", db::MIGRATOR.iter().count()),
        Command::Run { dry_run, metrics_file, .. } => {
            let job = job.expect("loaded above");
            let result = run_logged(pool, &job, Mode::Run, dry_run).await;
            if let Some(path) = &metrics_file {
                write_metrics_file(path, &job.name, &metrics::Ended::of(&result), Some(pool)).await;
            }
            print_finished(&result?);
        }
        Command::Rematch { since, until, dry_run, .. } => {
            let job = job.expect("loaded above");
            let mode = Mode::Rematch { since: time_arg(&job, "since", since)?, until: time_arg(&job, "until", until)? };
            print_finished(&run_logged(pool, &job, mode, dry_run).await?);
        }
        Command::Resolve { event_id, to, file, note, by, dry_run, .. } => {
            let requests = resolve_requests(file, event_id, to, note)?;
            let resolved = resolve::resolve(pool, &job.expect("loaded above"), &requests, &who(by), dry_run).await?;
            print!("{}", resolve::text(&resolved, dry_run));
        }
        Command::Reopen { event_id, note, by, .. } => {
            reopen(pool, &job.expect("loaded above"), event_id, note, by).await?
        }
        Command::History { event_id, format } => {
            print!("{}", resolve::history(pool, event_id, matches!(format, HistoryFormat::Json)).await?);
        }
        Command::Undo { run, dry_run, .. } => undo(pool, job, run, dry_run).await?,
        Command::Explain { event_id, .. } => {
            print!("{}", inspect::explain_event(pool, &job.expect("loaded above"), event_id).await?)
        }
        Command::Verify { repair, .. } => verify_command(pool, job.as_ref(), repair).await?,
        Command::Enqueue { files } => enqueue(pool, &files).await?,
        Command::Suggest { since, until, min_support, format, accept, write, rematch, .. } => {
            let job = job.expect("loaded above");
            let scope =
                suggest::Scope { since: time_arg(&job, "since", since)?, until: time_arg(&job, "until", until)? };
            match accept {
                None => {
                    let found = suggest::suggest(pool, &job, scope, min_support as usize).await?;
                    match format {
                        HistoryFormat::Json => println!("{}", serde_json::to_string_pretty(&found)?),
                        HistoryFormat::Text => print!("{}", suggest::text(&found, &job.path)),
                    }
                }
                Some(id) => accept_suggestion(pool, &job, scope, &id, write, rematch).await?,
            }
        }
        Command::Gen { command } => generate(pool, command).await?,
        Command::Report { command: ReportCommand::List { job, limit } } => {
            print!("{}", report::history::list(pool, job.as_deref(), limit).await?);
        }
        Command::Report { command: ReportCommand::Show { run, format } } => {
            report::history::show(pool, run, format, &mut std::io::stdout().lock()).await?;
        }
        Command::Demo { samples, .. } => {
            demo_command(pool, &job.expect("loaded above"), &samples, &cli.database_url).await?
        }
        Command::Serve(args) => serve::run(pool, &args).await?,
        Command::Users { command } => users_command(pool, command).await?,
    }
    Ok(())
}

/// `resolve`'s decisions: from a filled-in file, or one from EVENT_ID and `--to`.
fn resolve_requests(
    file: Option<std::path::PathBuf>,
    event_id: Option<i64>,
    to: Option<String>,
    note: Option<String>,
) -> Result<Vec<resolve::Request>> {
    Ok(match (file, event_id, to) {
        (Some(file), _, _) => resolve::read_file(&file)?,
        (None, Some(event_id), Some(to)) => {
            let to = to.parse().map_err(|e| anyhow::anyhow!("--to {e}"))?;
            vec![resolve::Request { line: None, event_id, to, note, reported_reason: None, seen: None }]
        }
        _ => anyhow::bail!("give EVENT_ID and --to, or --file"),
    })
}

/// `reopen EVENT_ID`: an analyst's decision taken back.
async fn reopen(
    pool: &sqlx::PgPool,
    job: &job::Job,
    event_id: i64,
    note: Option<String>,
    by: Option<String>,
) -> Result<()> {
    let requests =
        [resolve::Request { line: None, event_id, to: resolve::To::Reopen, note, reported_reason: None, seen: None }];
    print!("{}", resolve::text(&resolve::resolve(pool, job, &requests, &who(by), false).await?, false));
    Ok(())
}

/// `undo RUN`: run `run`'s decisions reverted, with the job file given or the one it ran with.
async fn undo(pool: &sqlx::PgPool, job: Option<job::Job>, run: i64, dry_run: bool) -> Result<()> {
    let past = callrecon::runs::past(pool, run)
        .await?
        .with_context(|| format!("no run {run}; `callrecon report list` shows the runs"))?;
    let job = match job {
        Some(job) => job,
        None => {
            let file = past.job_file.as_deref().with_context(|| {
                format!("run {run} does not say which job file it ran with; give it with --job FILE")
            })?;
            job::load(std::path::Path::new(file))
                .with_context(|| format!("the job file of run {run} ({file}); give another with --job FILE"))?
        }
    };
    if past.job != job.name {
        anyhow::bail!("run {run} is a run of job {}, not {}", past.job, job.name);
    }
    if !past.committed {
        anyhow::bail!("run {run} changed nothing (it failed, was dry or is still running): nothing to undo");
    }
    let done = run_logged(pool, &job, Mode::Undo { run }, dry_run).await?;
    print_finished(&done);
    Ok(())
}

/// `verify`: the differences printed; unrepaired ones are an error (their own exit status).
async fn verify_command(pool: &sqlx::PgPool, job: Option<&job::Job>, repair: bool) -> Result<()> {
    let verified = verify::verify(pool, job.map(|j| j.name.as_str()), repair).await?;
    print!("{}", verify::text(&verified));
    if verified.differs() && !repair {
        return Err(verify::Unrepaired { calls: verified.calls_differing, groups: verified.groups_differing }.into());
    }
    Ok(())
}

/// `gen calls` / `gen events`: the benchmark's data.
async fn generate(pool: &sqlx::PgPool, command: GenCommand) -> Result<()> {
    let scale = |s: &callrecon::cli::GenScale| datagen::Scale {
        calls: s.calls,
        days: s.days,
        until: s.until,
        seed: s.seed,
        groups: s.groups,
    };
    let mut conn = pool.acquire().await?;
    match command {
        GenCommand::Calls { scale: s, layout, partition_by } => {
            if layout == datagen::Layout::Partitioned {
                let (from, until) = scale(&s).span();
                datagen::partition_calls(&mut conn, &datagen::partitions(partition_by, from, until)).await?;
            }
            let n = datagen::calls(&mut conn, &scale(&s)).await?;
            println!("generated {n} calls and {} call groups", scale(&s).groups().count());
        }
        GenCommand::Events { scale: s, from, to, count, salt, master_share } => {
            let n = datagen::events(&mut conn, &scale(&s), from, to, count, (salt, master_share)).await?;
            println!("queued {n} events about calls from {from} to {to}");
        }
    }
    Ok(())
}

/// `demo`: the sample data loaded and run, then what to try next.
async fn demo_command(
    pool: &sqlx::PgPool,
    job: &job::Job,
    samples: &std::path::Path,
    database_url: &str,
) -> Result<()> {
    let runs = demo::demo(pool, samples, job).await?;
    let last = runs.last().expect("demo runs");
    println!("\nOpen the report in a browser: {}", last.dir.join("report.html").display());
    print!("{}", demo::next_steps(pool, database_url, job).await?);
    Ok(())
}

/// `users add` / `list` / `revoke`: the intake API's users.
async fn users_command(pool: &sqlx::PgPool, command: UsersCommand) -> Result<()> {
    match command {
        UsersCommand::Add { name, roles } => print!("{}", users::created_text(&users::add(pool, &name, &roles).await?)),
        UsersCommand::List => print!("{}", users::list_text(&users::list(pool).await?)),
        UsersCommand::Revoke { name } => {
            users::revoke(pool, &name).await?;
            println!("revoked API user {name}: its secret and tokens no longer work");
        }
    }
    Ok(())
}

/// `--since` / `--until`: a time, without an offset in the job's time zone.
fn time_arg(job: &job::Job, flag: &str, v: Option<String>) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    v.map(|s| {
        event::parse_time(&s, job.timezone).map_err(anyhow::Error::msg).with_context(|| format!("--{flag} {s:?}"))
    })
    .transpose()
}

/// `suggest --accept ID`: the diff; with `--write` the job file written; with `--rematch` the
/// scope rematched under the written rules.
async fn accept_suggestion(
    pool: &sqlx::PgPool,
    job: &job::Job,
    scope: suggest::Scope,
    id: &str,
    write: bool,
    rematch: bool,
) -> Result<()> {
    let accepted = suggest::accept(pool, job, scope, id).await?;
    print!("{}", accepted.diff);
    if !write {
        println!("\nnot written: add --write to write it into {}", job.path.display());
        return Ok(());
    }
    suggest::write(job, &accepted)?;
    println!("\nwrote {}: {}", job.path.display(), accepted.change.describe());
    let mut command = format!("callrecon rematch --job {}", job.path.display());
    for (flag, t) in [("since", scope.since), ("until", scope.until)] {
        if let Some(t) = t {
            command.push_str(&format!(" --{flag} {}", t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)));
        }
    }
    if !rematch {
        println!("the rules changed for later runs; to decide past events by them, run `{command}`");
        return Ok(());
    }
    let changed = job::load(&job.path)?;
    let mode = Mode::Rematch { since: scope.since, until: scope.until };
    print_finished(&run_logged(pool, &changed, mode, false).await?);
    Ok(())
}

/// Behind a transaction pooler (`--pooler transaction`), the commands whose statements do not
/// all run in transactions that set callrecon's settings themselves are refused, by name.
fn refuse_without_session(command: &Command) -> Result<()> {
    let name = match command {
        Command::Migrate
        | Command::Grants { .. }
        | Command::Run { .. }
        | Command::Rematch { .. }
        | Command::Undo { .. }
        | Command::Enqueue { .. }
        | Command::Schedule { .. }
        | Command::Verify { .. }
        | Command::Serve(_)
        | Command::GenerateDocs { .. } => return Ok(()),
        Command::Explain { .. } => "explain",
        Command::Resolve { .. } => "resolve",
        Command::Reopen { .. } => "reopen",
        Command::History { .. } => "history",
        Command::Gen { .. } => "gen",
        Command::Report { .. } => "report",
        Command::Demo { .. } => "demo",
        Command::Suggest { .. } => "suggest",
        Command::Users { .. } => "users",
    };
    anyhow::bail!(
        "`callrecon {name}` needs a session of its own: run it with --pooler session, over a direct connection or \
         a session-pooling PgBouncer database (docs/database.md, \"Behind PgBouncer\")"
    )
}

/// Who decides: `--by` (or `$USER`), else the process's user by its uid, as the system's user
/// database names it (cron, systemd units and containers often set no `$USER`), else `uid N`.
fn who(by: Option<String>) -> String {
    by.map(|b| b.trim().to_owned()).filter(|b| !b.is_empty()).unwrap_or_else(|| {
        whoami::username().unwrap_or_else(|_| {
            // SAFETY: getuid takes nothing and cannot fail.
            format!("uid {}", unsafe { libc::getuid() })
        })
    })
}

/// Runs the job and logs its summary as one structured line.
async fn run_logged(pool: &sqlx::PgPool, job: &job::Job, mode: Mode, dry_run: bool) -> Result<run::Finished> {
    let kind = match mode {
        Mode::Run => "run",
        Mode::Rematch { .. } => "rematch",
        Mode::Undo { .. } => "undo",
    };
    let started = std::time::Instant::now();
    let result = run::execute(pool, job, mode, dry_run).await;
    metrics::log_summary(&job.name, kind, dry_run, &metrics::Ended::of(&result), started.elapsed());
    result
}

/// `run --metrics-file`: a file that cannot be written is a warning; the run's outcome stands.
async fn write_metrics_file(
    path: &std::path::Path,
    job: &str,
    ended: &metrics::Ended<'_>,
    pool: Option<&sqlx::PgPool>,
) {
    if let Err(e) = metrics::write_textfile(path, job, ended, pool).await {
        tracing::error!(error = %db::error_line(&e), "the metrics file could not be written");
        eprintln!("callrecon: warning: the metrics file could not be written: {}", db::error_line(&e));
    }
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
    let mut tx = db::begin(pool).await?;
    let n = ingest::queue::enqueue(&mut tx, &payloads).await?;
    tx.commit().await.context("committing the events to event_queue")?;
    println!("enqueued {n} events");
    if !unreadable.is_empty() {
        for u in &unreadable {
            eprintln!("not enqueued: {u}");
        }
        anyhow::bail!("{} records could not be read and were not enqueued", unreadable.len());
    }
    Ok(())
}
