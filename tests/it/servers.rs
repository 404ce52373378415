//! Disposable servers for the deployment tests, each stopped and removed when dropped: a
//! PostgreSQL of its own that accepts only TLS, with a CA and certificates made by the `openssl`
//! CLI; PgBouncer in front of the test server. initdb, postgres and pgbouncer refuse to run as
//! root: as root (CI), they run as the `postgres` OS user.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::PgPool;

fn is_root() -> bool {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `program` to run as the `postgres` OS user when this process is root; `setpriv` execs it, so
/// the child's id is the program's own.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A temporary folder the `postgres` user owns (as root) or this user does.
fn owned_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    if is_root() {
        run(Command::new("chown").args(["-R", "postgres:"]).arg(dir.path()), "chown");
    }
    dir
}

/// Writes `text` to `path`, owned by the `postgres` user as root, readable by its owner only.
fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    if is_root() {
        run(Command::new("chown").arg("postgres:").arg(path), "chown");
    }
}

/// A TCP port free now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until something accepts TCP connections on `port`.
fn wait_for_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} not listening on {port}: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The newest PostgreSQL server binaries installed (Debian's layout).
fn postgres_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's binaries under /usr/lib/postgresql")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort_by_key(|p| p.parent().and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok()));
    found.pop().expect("PostgreSQL's initdb under /usr/lib/postgresql/*/bin")
}

/// A PostgreSQL on 127.0.0.1 that accepts only TLS (`hostssl`; `hostnossl … reject`), with a
/// certificate for `localhost` only, signed by a CA of its own; role `postgres` with trust, role
/// `tlsuser` by its client certificate alone.
pub struct TlsPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl TlsPostgres {
    pub fn start() -> TlsPostgres {
        let dir = owned_tempdir();
        let d = dir.path();
        let openssl = |args: &[&str]| run(Command::new("openssl").args(args).current_dir(d), "openssl");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=callrecon test CA",
        ]);
        let sign = |name: &str, cn: &str, ext: Option<&str>| {
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ]);
            let mut args = vec!["x509", "-req", "-in", &format!("{name}.csr")[..]]
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>();
            args.extend(
                ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-out"].map(str::to_owned),
            );
            args.push(format!("{name}.crt"));
            if let Some(ext) = ext {
                std::fs::write(d.join(format!("{name}.ext")), ext).unwrap();
                args.extend(["-extfile".to_owned(), format!("{name}.ext")]);
            }
            run(Command::new("openssl").args(&args).current_dir(d), "openssl x509");
        };
        // The server's certificate names `localhost` and nothing else (not 127.0.0.1).
        sign("server", "localhost", Some("subjectAltName=DNS:localhost\n"));
        sign("client", "tlsuser", None);
        write_private(&d.join("server.key"), &std::fs::read_to_string(d.join("server.key")).unwrap());
        for f in ["server.crt", "ca.crt"] {
            if is_root() {
                run(Command::new("chown").arg("postgres:").arg(d.join(f)), "chown");
            }
        }
        let bin = postgres_bin();
        let data = d.join("data");
        run(
            as_postgres(&bin.join("initdb")).arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ]),
            "initdb",
        );
        let port = free_port();
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{dir}'\nmax_connections = 60\n\
             fsync = off\nssl = on\nssl_cert_file = '{dir}/server.crt'\nssl_key_file = '{dir}/server.key'\n\
             ssl_ca_file = '{dir}/ca.crt'\n",
            dir = d.display()
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        text.push_str(&conf);
        write_private(&data.join("postgresql.conf"), &text);
        write_private(
            &data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all tlsuser 127.0.0.1/32 cert\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 0.0.0.0/0 reject\n",
        );
        let log = d.join("server.log");
        run(
            as_postgres(&bin.join("pg_ctl")).arg("-D").arg(&data).arg("-l").arg(&log).args(["-w", "-t", "30", "start"]),
            "pg_ctl start",
        );
        let socket_dir = d.display().to_string();
        let server = TlsPostgres { dir, bin, port };
        wait_for_port(port, "the TLS PostgreSQL", &log);
        let mut psql = as_postgres(&server.bin.join("psql"));
        psql.args(["-h", &socket_dir, "-p", &port.to_string(), "-U", "postgres", "-d", "postgres", "-c"]);
        run(psql.arg("create role tlsuser superuser login"), "create role tlsuser");
        server
    }

    pub fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The URL of `database` as `user` on `host`, with `params` (`sslmode=…`).
    pub fn url(&self, host: &str, user: &str, database: &str, params: &str) -> String {
        format!("postgres://{user}@{host}:{}/{database}?{params}", self.port)
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// PgBouncer (Debian's package) on 127.0.0.1 in front of the test server, every database of it
/// (`* = …`), in `mode` pooling, configured as usual: `ignore_startup_parameters =
/// extra_float_digits`, trust for the `postgres` user, `pool_size` server connections a database.
pub struct PgBouncer {
    dir: tempfile::TempDir,
    child: Child,
    pub port: u16,
}

impl PgBouncer {
    pub fn start(mode: &str, pool_size: u32) -> PgBouncer {
        let program = Path::new("/usr/sbin/pgbouncer");
        assert!(program.exists(), "PgBouncer is not installed: scripts/test.sh installs Debian's pgbouncer package");
        let upstream = url::Url::parse(&std::env::var("DATABASE_URL").expect("DATABASE_URL")).unwrap();
        let (host, server_port) = (upstream.host_str().unwrap().to_owned(), upstream.port().unwrap_or(5432));
        let dir = owned_tempdir();
        let d = dir.path();
        let port = free_port();
        write_private(&d.join("users.txt"), "\"postgres\" \"\"\n");
        write_private(
            &d.join("pgbouncer.ini"),
            &format!(
                "[databases]\n* = host={host} port={server_port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
                 listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {dir}/users.txt\n\
                 pool_mode = {mode}\ndefault_pool_size = {pool_size}\nmax_client_conn = 200\n\
                 ignore_startup_parameters = extra_float_digits\nlogfile = {dir}/pgbouncer.log\n\
                 pidfile = {dir}/pgbouncer.pid\nadmin_users = postgres\n",
                dir = d.display()
            ),
        );
        let child = as_postgres(program)
            .arg(d.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting pgbouncer");
        let bouncer = PgBouncer { dir, child, port };
        wait_for_port(port, "PgBouncer", &bouncer.dir.path().join("pgbouncer.log"));
        bouncer
    }

    /// The URL of `database` through this PgBouncer.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The name of the test's database.
pub async fn database_name(pool: &PgPool) -> String {
    sqlx::query_scalar("select current_database()").fetch_one(pool).await.unwrap()
}

/// A long-running `callrecon` (`serve`, `schedule`): its stderr in a file, its stdout read line by
/// line; killed if the test ends before it is stopped.
pub struct Daemon {
    child: Child,
    log: tempfile::NamedTempFile,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Daemon {
    pub fn start(url: &str, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_callrecon"))
            .args(["--database-url", url])
            .args(args)
            .env("RUST_LOG", "callrecon=info,warn")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        Daemon { child, log, stdout }
    }

    /// The next line of stdout containing `text` (blocking: the daemon prints it as it starts).
    pub fn line_with(&mut self, text: &str) -> String {
        use std::io::BufRead as _;
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "no line with {text:?} before stdout closed; log:\n{}", self.log());
            if line.contains(text) {
                return line.trim().to_owned();
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// SIGTERM, then exit status 0 within 20 s.
    pub fn stop(&mut self) {
        // SAFETY: kill with the child's pid and a signal number.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{status}; log:\n{}", self.log());
                return;
            }
            assert!(Instant::now() < deadline, "still running 20 s after SIGTERM; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The binary run to its end with `--database-url url`, `args` and `env`.
pub fn callrecon_at_env(url: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_callrecon"))
        .args(["--database-url", url])
        .args(args)
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}
