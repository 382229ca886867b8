//! Throwaway local PostgreSQL clusters for the tests and the demo: `initdb` into a temporary
//! directory, a free loopback port, `wal_level = logical`, started with `pg_ctl`. When running as
//! root the server runs as the `postgres` OS user (PostgreSQL refuses to run as root).
//!
//! A cluster is stopped and its directory removed when the [`LocalCluster`] is dropped, and also
//! by a small watchdog process when the owning process dies without dropping it (a test binary's
//! statics, a kill -9), so no cluster outlives its owner.

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Why a cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install the PostgreSQL \
         server package (e.g. `apt-get install postgresql`) or set STAGINGPROP_PG_BIN to the \
         directory that holds initdb"
    )]
    BinariesMissing,
    #[error(
        "running as root, but there is no `postgres` OS user to run PostgreSQL as: create one (e.g. install the postgresql package)"
    )]
    NoPostgresUser,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// Finds the directory holding `initdb`: `STAGINGPROP_PG_BIN`, then the newest
/// `/usr/lib/postgresql/*/bin`, then `pg_config --bindir`, then `PATH`.
pub fn find_pg_bin() -> Result<PathBuf, ClusterError> {
    if let Some(dir) = std::env::var_os("STAGINGPROP_PG_BIN") {
        let dir = PathBuf::from(dir);
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
        return Err(ClusterError::BinariesMissing);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
            return Ok(dir);
        }
    }
    Err(ClusterError::BinariesMissing)
}

/// The OS user the server runs as: (uid, gid) of `postgres` when we are root, else `None`
/// (run as ourselves).
fn server_user() -> Result<Option<(u32, u32)>, ClusterError> {
    let me = fs::metadata("/proc/self").map_err(io_err("reading /proc/self"))?;
    if me.uid() != 0 {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").map_err(io_err("reading /etc/passwd"))?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() > 3 && fields[0] == "postgres" {
            let uid = fields[2]
                .parse()
                .map_err(|_| ClusterError::NoPostgresUser)?;
            let gid = fields[3]
                .parse()
                .map_err(|_| ClusterError::NoPostgresUser)?;
            return Ok(Some((uid, gid)));
        }
    }
    Err(ClusterError::NoPostgresUser)
}

/// A free TCP port on 127.0.0.1 (free when asked; `start` retries if it is taken meanwhile).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Options for a new cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Shown in the directory name and logs: "staging", "production".
    pub name: String,
    /// Extra `postgresql.conf` lines.
    pub settings: Vec<String>,
    /// Extra `pg_hba.conf` lines, placed before the default trust rules (first match wins).
    pub hba: Vec<String>,
    /// Turn fsync off: much faster, and a process kill still loses nothing (only an OS crash would).
    pub fast_unsafe: bool,
    /// The server binaries' directory; `None`: [`find_pg_bin`].
    pub bin: Option<PathBuf>,
}

impl ClusterOptions {
    pub fn new(name: &str) -> Self {
        ClusterOptions {
            name: name.to_owned(),
            settings: Vec::new(),
            hba: Vec::new(),
            fast_unsafe: true,
            bin: None,
        }
    }
}

/// A running throwaway cluster. The superuser is `postgres` with trust authentication on loopback.
pub struct LocalCluster {
    pub name: String,
    pub port: u16,
    /// Holds `data/`, `server.log` and the Unix socket.
    pub root: PathBuf,
    pub bin: PathBuf,
    run_as: Option<(u32, u32)>,
    watchdog: Option<std::process::Child>,
}

impl LocalCluster {
    /// initdb + start; fails with a clear error when PostgreSQL is not installed.
    pub fn start(options: &ClusterOptions) -> Result<LocalCluster, ClusterError> {
        let bin = match &options.bin {
            Some(bin) if bin.join("initdb").is_file() => bin.clone(),
            Some(_) => return Err(ClusterError::BinariesMissing),
            None => find_pg_bin()?,
        };
        let run_as = server_user()?;
        let root = make_root(&options.name, run_as)?;
        let mut cluster = LocalCluster {
            name: options.name.clone(),
            port: 0,
            root,
            bin,
            run_as,
            watchdog: None,
        };
        cluster.watchdog = cluster.spawn_watchdog().ok();
        cluster.initdb(options)?;
        cluster.start_on_a_free_port()?;
        Ok(cluster)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    pub fn log_file(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// A libpq key=value connection string for `dbname` as `user`.
    pub fn conninfo(&self, dbname: &str, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={dbname} user={user}",
            self.port
        )
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd.env("LC_ALL", "C").env_remove("PGDATA");
        cmd
    }

    fn run(&self, what: &str, cmd: &mut Command) -> Result<(), ClusterError> {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!("running {what}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ClusterError::Command {
                what: format!("{what} for the {} cluster", self.name),
                detail: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    self.log_tail()
                ),
            })
        }
    }

    fn log_tail(&self) -> String {
        match fs::read_to_string(self.log_file()) {
            Ok(log) => {
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                format!("\nserver log ({}):\n{tail}", self.log_file().display())
            }
            Err(_) => String::new(),
        }
    }

    fn initdb(&self, options: &ClusterOptions) -> Result<(), ClusterError> {
        let data = self.data_dir();
        self.run(
            "initdb",
            self.command("initdb")
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
                .arg("--locale=C"),
        )?;
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_owned(),
            format!("unix_socket_directories = '{}'", self.root.display()),
            "wal_level = logical".to_owned(),
            "max_replication_slots = 20".to_owned(),
            "max_wal_senders = 20".to_owned(),
            "max_connections = 100".to_owned(),
            // copy commits the parts of a table loaded by several workers together.
            "max_prepared_transactions = 20".to_owned(),
            "logging_collector = off".to_owned(),
            "log_min_messages = warning".to_owned(),
            "shared_buffers = 128MB".to_owned(),
        ];
        if options.fast_unsafe {
            conf.push("fsync = off".to_owned());
            conf.push("full_page_writes = off".to_owned());
        }
        conf.extend(options.settings.iter().cloned());
        append(&data.join("postgresql.conf"), &conf.join("\n"))?;
        let mut hba = options.hba.clone();
        hba.extend([
            "local all all trust".to_owned(),
            "host all all 127.0.0.1/32 trust".to_owned(),
            "host replication all 127.0.0.1/32 trust".to_owned(),
        ]);
        fs::write(data.join("pg_hba.conf"), hba.join("\n") + "\n")
            .map_err(io_err("writing pg_hba.conf"))
    }

    /// Starts on a free loopback port, trying another when one is taken meanwhile.
    fn start_on_a_free_port(&mut self) -> Result<(), ClusterError> {
        let mut last = None;
        for _ in 0..5 {
            self.port = free_port().map_err(io_err("finding a free port"))?;
            match self.write_port_and_start() {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn write_port_and_start(&self) -> Result<(), ClusterError> {
        append(
            &self.data_dir().join("postgresql.conf"),
            &format!("port = {}", self.port),
        )?;
        self.start_server()
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn start_server(&self) -> Result<(), ClusterError> {
        self.run(
            "pg_ctl start",
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.log_file())
                .args(["-w", "-t", "60", "start"]),
        )
    }

    /// Stops the server: `fast` rolls back sessions and shuts down cleanly; `immediate` is a crash.
    pub fn stop_server(&self, mode: &str) -> Result<(), ClusterError> {
        self.run(
            "pg_ctl stop",
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", mode, "-w", "-t", "60", "stop"]),
        )
    }

    /// Writes a file into the data directory, owned by the server's OS user with `mode`
    /// (e.g. a TLS key, which PostgreSQL only reads when nobody else can).
    pub fn install_file(
        &self,
        name: &str,
        contents: &[u8],
        mode: u32,
    ) -> Result<PathBuf, ClusterError> {
        let path = self.data_dir().join(name);
        fs::write(&path, contents).map_err(io_err(format!("writing {}", path.display())))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(io_err("setting permissions"))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(io_err(format!("giving {} to postgres", path.display())))?;
        }
        Ok(path)
    }

    /// A hot standby of this cluster, streaming through the physical slot `slot` (created here,
    /// reserving WAL at once). Made with the low-level backup API (`pg_backup_start`, a file copy,
    /// `pg_backup_stop`), so it needs no pg_basebackup: the npm builds of other majors lack it.
    /// `settings`: extra `postgresql.conf` lines of the standby.
    pub fn start_standby(
        &self,
        name: &str,
        slot: &str,
        settings: &[String],
    ) -> Result<LocalCluster, ClusterError> {
        let root = make_root(name, self.run_as)?;
        let mut standby = LocalCluster {
            name: name.to_owned(),
            port: 0,
            root,
            bin: self.bin.clone(),
            run_as: self.run_as,
            watchdog: None,
        };
        standby.watchdog = standby.spawn_watchdog().ok();
        self.psql(
            "postgres",
            &format!("SELECT pg_create_physical_replication_slot('{slot}', true)"),
        )?;
        let (from, to) = (self.data_dir(), standby.data_dir());
        let (from, to) = (from.display(), to.display());
        // One psql session: the backup must end in the session that started it. The copy leaves
        // out what a base backup does (the pid file, WAL, slots); WAL comes through the slot.
        // Files that vanish while they are copied (statistics' temporary files) do not matter.
        let script = format!(
            "SELECT pg_backup_start('{name}', true);\n\
             \\! cp -a '{from}/.' '{to}' 2>/dev/null; rm -f '{to}/postmaster.pid' '{to}/postmaster.opts'; rm -rf '{to}'/pg_wal/* '{to}'/pg_replslot/*; mkdir -p '{to}/pg_wal/archive_status'\n\
             \\o '{to}/backup_label'\n\
             SELECT labelfile FROM pg_backup_stop(false);\n\
             \\o\n"
        );
        let script_path = standby.root.join("backup.sql");
        fs::write(&script_path, script).map_err(io_err("writing the backup script"))?;
        self.run(
            "the base backup",
            self.command("psql")
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
                .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
                .arg("-p")
                .arg(self.port.to_string())
                .arg("-f")
                .arg(&script_path),
        )?;
        let mut conf = vec![
            format!("unix_socket_directories = '{}'", standby.root.display()),
            format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres application_name={name}'",
                self.port
            ),
            format!("primary_slot_name = '{slot}'"),
            "hot_standby = on".to_owned(),
            "hot_standby_feedback = on".to_owned(),
        ];
        conf.extend(settings.iter().cloned());
        append(
            &standby.data_dir().join("postgresql.conf"),
            &conf.join("\n"),
        )?;
        standby.install_file("standby.signal", b"", 0o600)?;
        standby.start_on_a_free_port()?;
        Ok(standby)
    }

    /// Promotes a standby to a primary and waits until it accepts writes.
    pub fn promote(&self) -> Result<(), ClusterError> {
        self.run(
            "pg_ctl promote",
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-w", "-t", "60", "promote"]),
        )
    }

    /// SIGKILL to the postmaster: the harshest crash, for fault tests.
    pub fn kill_postmaster(&self) -> Result<(), ClusterError> {
        let pid_file = fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .map_err(io_err("reading postmaster.pid"))?;
        let pid = pid_file.lines().next().unwrap_or("").trim().to_owned();
        self.run("kill -9", Command::new("kill").args(["-9", &pid]))?;
        // Wait for it to be gone so a restart does not race the old one.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Runs SQL through psql as the superuser, failing on the first error; returns stdout.
    pub fn psql(&self, dbname: &str, sql: &str) -> Result<String, ClusterError> {
        let out = self
            .command("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-U", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(dbname)
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("running psql"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(ClusterError::Command {
                what: format!("psql on the {} cluster", self.name),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    /// A watchdog that stops the server and removes the directory once this process is gone.
    fn spawn_watchdog(&self) -> io::Result<std::process::Child> {
        let script = format!(
            "while kill -0 {parent} 2>/dev/null; do sleep 1; done; \
             {pg_ctl} -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{root}'",
            parent = std::process::id(),
            pg_ctl = self.run_as_prefix(&self.bin.join("pg_ctl").display().to_string()),
            data = self.data_dir().display(),
            root = self.root.display(),
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
    }

    fn run_as_prefix(&self, program: &str) -> String {
        match self.run_as {
            Some(_) => format!("runuser -u postgres -- '{program}'"),
            None => format!("'{program}'"),
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if self.data_dir().join("postmaster.pid").exists() {
            let _ = self.stop_server("immediate");
        }
        let _ = fs::remove_dir_all(&self.root);
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

fn append(path: &Path, text: &str) -> Result<(), ClusterError> {
    use std::io::Write;
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    writeln!(file, "\n{text}").map_err(io_err(format!("writing {}", path.display())))
}

/// A fresh directory under the system temp dir, owned by the server's user.
fn make_root(name: &str, run_as: Option<(u32, u32)>) -> Result<PathBuf, ClusterError> {
    let base = std::env::temp_dir();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let root = base.join(format!(
        "stagingprop-{name}-{}-{:x}",
        std::process::id(),
        stamp & 0xffff_ffff
    ));
    fs::create_dir_all(&root).map_err(io_err(format!("creating {}", root.display())))?;
    fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
        .map_err(io_err("setting permissions"))?;
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(&root, Some(uid), Some(gid))
            .map_err(io_err(format!("giving {} to postgres", root.display())))?;
    }
    Ok(root)
}
