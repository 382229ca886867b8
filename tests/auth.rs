//! Authentication and TLS on both kinds of connection, against real servers.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use stagingprop::cluster::{ClusterOptions, LocalCluster};
use stagingprop::config::Config;
use stagingprop::model::Lsn;
use stagingprop::pg::connect::Endpoint;
use stagingprop::pg::replication::{
    PgOutputOptions, ReplicationClient, ReplicationError, SnapshotAction,
};
use stagingprop::pgoutput::LogicalMessage;
use support::{CLEARTEXT_USER, MD5_USER, SCRAM_USER, TEST_PASSWORD, clusters, psql};

fn with_password(cluster: &LocalCluster, user: &str, password: Option<&str>) -> Endpoint {
    let mut endpoint = support::endpoint(cluster, "postgres", user);
    if let Some(pw) = password {
        endpoint.pg.password(pw);
    }
    endpoint
}

#[tokio::test]
async fn md5_scram_and_cleartext_passwords_authenticate_replication_connections() {
    let c = clusters();
    for user in [MD5_USER, SCRAM_USER, CLEARTEXT_USER] {
        let endpoint = with_password(&c.staging, user, Some(TEST_PASSWORD));
        let mut repl = ReplicationClient::connect(&endpoint)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let ident = repl.identify_system().await.unwrap();
        assert!(ident.xlogpos.is_valid());
        let who = repl.simple_query("SELECT current_user").await.unwrap();
        assert_eq!(who.rows[0][0].as_deref(), Some(user));
        repl.close().await.unwrap();
        // The ordinary connection authenticates the same way.
        let client = endpoint.connect().await.unwrap();
        client.simple_query("SELECT 1").await.unwrap();
    }
}

#[tokio::test]
async fn wrong_or_missing_passwords_are_clear_errors() {
    let c = clusters();
    for user in [MD5_USER, SCRAM_USER, CLEARTEXT_USER] {
        let err = match ReplicationClient::connect(&with_password(&c.staging, user, Some("nope")))
            .await
        {
            Err(e) => e,
            Ok(_) => panic!("{user}: wrong password accepted"),
        };
        assert!(matches!(err, ReplicationError::AuthFailed { .. }), "{err}");
        assert_eq!(err.sqlstate(), Some("28P01"), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(user) && text.contains("password authentication failed"),
            "{text}"
        );
        assert!(!text.contains("nope"), "password leaked: {text}");

        let err = match ReplicationClient::connect(&with_password(&c.staging, user, None)).await {
            Err(e) => e,
            Ok(_) => panic!("{user}: no password accepted"),
        };
        assert!(
            matches!(err, ReplicationError::PasswordMissing { .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("password_env or password_file"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn passwords_come_from_files_named_in_the_config() {
    let c = clusters();
    let dir = scratch("pwfile");
    let file = dir.join("password");
    std::fs::write(&file, format!("{TEST_PASSWORD}\n")).unwrap();
    let text = format!(
        "[staging]\nurl = \"{}\"\npassword_file = \"{}\"\nsslmode = \"disable\"\n[production]\nurl = \"{}\"\n[[tables]]\nname = \"t\"\n",
        c.staging.conninfo("postgres", SCRAM_USER),
        file.display(),
        c.production.conninfo("postgres", "postgres"),
    );
    let config = Config::from_toml_str(&text, "test").unwrap();
    let endpoint = Endpoint::from_db_config(&config.staging).unwrap();
    let mut repl = ReplicationClient::connect(&endpoint).await.unwrap();
    repl.identify_system().await.unwrap();
    assert!(!endpoint.describe().contains(TEST_PASSWORD));
    let _ = std::fs::remove_dir_all(dir);
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stagingprop-auth-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("the TLS test needs the openssl command to make certificates: {e}")
        });
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate valid only for the name `db.example` (not for 127.0.0.1), so
/// verify-ca passes and verify-full fails when connecting by IP.
fn make_certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=stagingprop test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ];
    ca.extend(ec);
    openssl(dir, &ca);
    let mut csr = vec![
        "req",
        "-subj",
        "/CN=db.example",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ];
    csr.extend(ec);
    openssl(dir, &csr);
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:db.example\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
    let mut other = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=other CA",
        "-keyout",
        "other.key",
        "-out",
        "other.crt",
    ];
    other.extend(ec);
    openssl(dir, &other);
}

fn tls_endpoint(
    cluster: &LocalCluster,
    sslmode: &str,
    root: Option<&Path>,
) -> Result<Endpoint, String> {
    let mut text = format!(
        "[staging]\nurl = \"{}\"\nsslmode = \"{sslmode}\"\n",
        cluster.conninfo("postgres", "postgres")
    );
    if let Some(root) = root {
        text.push_str(&format!("sslrootcert = \"{}\"\n", root.display()));
    }
    text.push_str("[production]\nurl = \"host=127.0.0.1 dbname=p\"\n[[tables]]\nname = \"t\"\n");
    let config = Config::from_toml_str(&text, "test").map_err(|e| e.to_string())?;
    Endpoint::from_db_config(&config.staging).map_err(|e| e.to_string())
}

async fn uses_tls(endpoint: &Endpoint) -> Result<(bool, bool), String> {
    let mut repl = ReplicationClient::connect(endpoint)
        .await
        .map_err(|e| e.to_string())?;
    let row = repl
        .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .map_err(|e| e.to_string())?;
    let replication_tls = row.rows[0][0].as_deref() == Some("t");
    let client = endpoint.connect().await.map_err(|e| e.to_string())?;
    let ordinary_tls: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    Ok((replication_tls, ordinary_tls))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes_and_keepalives() {
    let dir = scratch("tls");
    make_certificates(&dir);
    let mut options = ClusterOptions::new("tls");
    // A short sender timeout: the stream must keep answering while idle.
    options.settings = vec!["wal_sender_timeout = '2s'".into()];
    let cluster = LocalCluster::start(&options).expect("start TLS cluster");
    cluster
        .install_file(
            "server.crt",
            &std::fs::read(dir.join("server.crt")).unwrap(),
            0o644,
        )
        .unwrap();
    cluster
        .install_file(
            "server.key",
            &std::fs::read(dir.join("server.key")).unwrap(),
            0o600,
        )
        .unwrap();
    psql(&cluster, "postgres", "ALTER SYSTEM SET ssl = on");
    psql(&cluster, "postgres", "SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));

    let ca = dir.join("ca.crt");
    let endpoint = tls_endpoint(&cluster, "verify-ca", Some(&ca)).unwrap();
    assert_eq!(uses_tls(&endpoint).await.unwrap(), (true, true));
    let endpoint = tls_endpoint(&cluster, "require", None).unwrap();
    assert_eq!(uses_tls(&endpoint).await.unwrap(), (true, true));
    let endpoint = tls_endpoint(&cluster, "prefer", None).unwrap();
    assert_eq!(uses_tls(&endpoint).await.unwrap(), (true, true));

    // verify-full checks the name: the certificate is for db.example, not 127.0.0.1.
    let endpoint = tls_endpoint(&cluster, "verify-full", Some(&ca)).unwrap();
    let err = uses_tls(&endpoint).await.unwrap_err();
    assert!(
        err.contains("TLS") && err.to_lowercase().contains("name"),
        "{err}"
    );
    // A certificate from another CA is refused.
    let endpoint = tls_endpoint(&cluster, "verify-ca", Some(&dir.join("other.crt"))).unwrap();
    let err = uses_tls(&endpoint).await.unwrap_err();
    assert!(err.contains("TLS"), "{err}");

    // The shared clusters have no TLS: prefer falls back, require refuses.
    let plain = &clusters().staging;
    let endpoint = tls_endpoint(plain, "prefer", None).unwrap();
    assert_eq!(uses_tls(&endpoint).await.unwrap(), (false, false));
    let endpoint = tls_endpoint(plain, "require", None).unwrap();
    let err = match ReplicationClient::connect(&endpoint).await {
        Err(e) => e,
        Ok(_) => panic!("require accepted a server without TLS"),
    };
    assert!(matches!(err, ReplicationError::TlsRefused { .. }), "{err}");

    // Streaming over TLS survives idling past wal_sender_timeout: keepalives are answered.
    psql(
        &cluster,
        "postgres",
        "CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t",
    );
    let endpoint = tls_endpoint(&cluster, "verify-ca", Some(&ca)).unwrap();
    let mut repl = ReplicationClient::connect(&endpoint).await.unwrap();
    repl.create_logical_slot("tls_slot", true, SnapshotAction::Nothing, false)
        .await
        .unwrap();
    let mut pgoutput = PgOutputOptions::new(vec!["p".into()]);
    pgoutput.status_interval = Duration::from_millis(500);
    let mut stream = repl
        .start_logical("tls_slot", Lsn::INVALID, &pgoutput)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    psql(&cluster, "postgres", "INSERT INTO t VALUES (1)");
    let insert = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let m = stream
                .next()
                .await
                .expect("stream alive after idling")
                .expect("not ended");
            if let LogicalMessage::Insert { new, .. } = m.message {
                return new;
            }
        }
    })
    .await
    .expect("insert arrives");
    assert_eq!(insert[0], stagingprop::model::Value::Text("1".into()));
    stream.close().await.unwrap();
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn staging_section(url: &str, extra: &str) -> Endpoint {
    let text = format!(
        "[staging]\nurl = \"{url}\"\nsslmode = \"disable\"\n{extra}\n[production]\nurl = \"host=127.0.0.1 dbname=p\"\n[[tables]]\nname = \"t\"\n"
    );
    let config = Config::from_toml_str(&text, "test").unwrap();
    Endpoint::from_db_config(&config.staging).unwrap()
}

#[tokio::test]
async fn the_password_file_is_matched_like_libpq_and_ignored_when_others_may_read_it() {
    let c = clusters();
    let dir = scratch("pgpass");
    let pgpass = dir.join("pgpass");
    let port = c.staging.port;
    let escaped = TEST_PASSWORD.replace('\\', "\\\\").replace(':', "\\:");
    std::fs::write(
        &pgpass,
        format!(
            "# lines that do not match come first\n\
             127.0.0.1:{}:*:{MD5_USER}:wrong\n\
             127.0.0.1:{port}:postgres:{MD5_USER}:{escaped}\n\
             *:*:*:{SCRAM_USER}:{escaped}\n",
            port + 1
        ),
    )
    .unwrap();
    set_mode(&pgpass, 0o600);
    for user in [MD5_USER, SCRAM_USER] {
        let url = format!(
            "{} passfile={}",
            c.staging.conninfo("postgres", user),
            pgpass.display()
        );
        let endpoint = staging_section(&url, "");
        let mut repl = ReplicationClient::connect(&endpoint)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        repl.identify_system().await.unwrap();
        repl.close().await.unwrap();
        endpoint.connect().await.unwrap();
    }
    // Readable by others: ignored, as libpq does, so the server asks for a password in vain.
    set_mode(&pgpass, 0o644);
    let url = format!(
        "{} passfile={}",
        c.staging.conninfo("postgres", SCRAM_USER),
        pgpass.display()
    );
    let endpoint = staging_section(&url, "");
    match ReplicationClient::connect(&endpoint).await {
        Err(ReplicationError::PasswordMissing { .. }) => {}
        Err(e) => panic!("expected a missing password, got {e}"),
        Ok(_) => panic!("an exposed password file was used"),
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_service_file_supplies_host_port_database_and_user() {
    let c = clusters();
    let dir = scratch("service");
    let services = dir.join("pg_service.conf");
    std::fs::write(
        &services,
        format!(
            "# test services\n[stg]\nhost=127.0.0.1\nport={}\ndbname=postgres\nuser={SCRAM_USER}\n\n\
             [prod]\nhost=127.0.0.1\nport={}\ndbname=postgres\nuser=postgres\n\n\
             [leaky]\nhost=127.0.0.1\npassword=secret\n",
            c.staging.port, c.production.port
        ),
    )
    .unwrap();
    let config = dir.join("stagingprop.toml");
    let write = |staging_url: &str| {
        std::fs::write(
            &config,
            format!(
                "[staging]\nurl = \"{staging_url}\"\npassword_env = \"STAGINGPROP_TEST_PW\"\nsslmode = \"disable\"\n\
                 [production]\nurl = \"service=prod\"\nsslmode = \"disable\"\n[[tables]]\nname = \"t\"\n"
            ),
        )
        .unwrap();
    };
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_stagingprop"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("PGSERVICEFILE", &services)
            .env("STAGINGPROP_TEST_PW", TEST_PASSWORD)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    write("service=stg");
    // status reaches both databases (it is unhealthy: there is no slot).
    let (code, out, err) = run(&["status", "--json"]);
    assert_eq!(code, Some(8), "{out}{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["slot"]["exists"], false);
    assert!(
        !status["problems"].to_string().contains("production:"),
        "production was reached: {status}"
    );
    // The url's own settings win over the service's.
    write(&format!("service=stg port={}", c.production.port + 1000));
    let (code, _, err) = run(&["status"]);
    assert_eq!(code, Some(3), "an unreachable port is exit 3: {err}");
    // A password in a service file is refused like one in the config.
    write("service=leaky");
    let (code, _, err) = run(&["status"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("service \"leaky\"") && !err.contains("secret"),
        "{err}"
    );
    write("service=nowhere");
    let (code, _, err) = run(&["status"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no service file defines"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_authenticate_both_kinds_of_connection() {
    let dir = scratch("clientcert");
    make_certificates(&dir);
    // A client certificate for role certuser, signed by the test CA.
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut csr = vec![
        "req",
        "-subj",
        "/CN=certuser",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
    ];
    csr.extend(ec);
    openssl(&dir, &csr);
    // Extensions make it an X.509 v3 certificate, which rustls requires.
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-extfile",
            "client.ext",
            "-in",
            "client.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "client.crt",
        ],
    );
    let mut options = ClusterOptions::new("clientcert");
    options.hba = vec!["hostssl all certuser 127.0.0.1/32 cert".into()];
    let cluster = LocalCluster::start(&options).expect("start the client certificate cluster");
    for (name, mode) in [
        ("server.crt", 0o644),
        ("server.key", 0o600),
        ("ca.crt", 0o644),
    ] {
        cluster
            .install_file(name, &std::fs::read(dir.join(name)).unwrap(), mode)
            .unwrap();
    }
    for sql in [
        "CREATE ROLE certuser LOGIN REPLICATION",
        "ALTER SYSTEM SET ssl = on",
        "ALTER SYSTEM SET ssl_ca_file = 'ca.crt'",
    ] {
        psql(&cluster, "postgres", sql);
    }
    psql(&cluster, "postgres", "SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));

    let key = dir.join("client.key");
    set_mode(&key, 0o600);
    let section = |extra: &str| {
        let text = format!(
            "[staging]\nurl = \"{}\"\nsslmode = \"verify-ca\"\nsslrootcert = \"{}\"\n{extra}\n[production]\nurl = \"host=127.0.0.1 dbname=p\"\n[[tables]]\nname = \"t\"\n",
            cluster.conninfo("postgres", "certuser"),
            dir.join("ca.crt").display()
        );
        Config::from_toml_str(&text, "test").map_err(|e| e.to_string())
    };
    let config = section(&format!(
        "sslcert = \"{}\"\nsslkey = \"{}\"",
        dir.join("client.crt").display(),
        key.display()
    ))
    .unwrap();
    let endpoint = Endpoint::from_db_config(&config.staging).unwrap();
    let mut repl = ReplicationClient::connect(&endpoint).await.unwrap();
    let who = repl.simple_query("SELECT current_user").await.unwrap();
    assert_eq!(who.rows[0][0].as_deref(), Some("certuser"));
    repl.close().await.unwrap();
    let client = endpoint.connect().await.unwrap();
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "certuser");

    // Without the certificate the server refuses.
    let plain = Endpoint::from_db_config(&section("").unwrap().staging).unwrap();
    assert!(ReplicationClient::connect(&plain).await.is_err());
    // Half a certificate is a config error; a key others may read is refused.
    let err = section(&format!(
        "sslcert = \"{}\"",
        dir.join("client.crt").display()
    ))
    .unwrap_err();
    assert!(
        err.contains("both sslcert") && err.contains("sslkey"),
        "{err}"
    );
    set_mode(&key, 0o644);
    let err = match Endpoint::from_db_config(&config.staging) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a key readable by others was used"),
    };
    assert!(
        err.contains("group or world access") && err.contains("chmod 0600"),
        "{err}"
    );
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

/// A refused login (a wrong password, or TLS the server does not offer) is exit 3 for every
/// command that connects, whichever side refuses, and the message says who refused what.
#[test]
fn every_command_reports_a_refused_login_as_exit_3() {
    let c = clusters();
    let dir = scratch("refused");
    let config = dir.join("stagingprop.toml");
    let staging_ok = format!(
        "url = \"{}\"\nsslmode = \"disable\"",
        c.staging.conninfo("postgres", "postgres")
    );
    let production_ok = format!(
        "url = \"{}\"\nsslmode = \"disable\"",
        c.production.conninfo("postgres", "postgres")
    );
    let wrong_password = |cluster: &LocalCluster| {
        format!(
            "url = \"{}\"\npassword_env = \"STAGINGPROP_TEST_PW\"\nsslmode = \"disable\"",
            cluster.conninfo("postgres", SCRAM_USER)
        )
    };
    // The test clusters have no certificates: requiring TLS is refused.
    let no_tls = |cluster: &LocalCluster| {
        format!(
            "url = \"{}\"\nsslmode = \"require\"",
            cluster.conninfo("postgres", "postgres")
        )
    };
    let cases = [
        (
            "staging password",
            wrong_password(&c.staging),
            production_ok.clone(),
            "password authentication failed",
        ),
        (
            "production password",
            staging_ok.clone(),
            wrong_password(&c.production),
            "password authentication failed",
        ),
        (
            "staging TLS",
            no_tls(&c.staging),
            production_ok.clone(),
            "TLS",
        ),
        (
            "production TLS",
            staging_ok.clone(),
            no_tls(&c.production),
            "TLS",
        ),
    ];
    for (case, staging, production, says) in cases {
        std::fs::write(
            &config,
            format!(
                "[staging]\n{staging}\n[production]\n{production}\n\
                 [sync]\nslot = \"refused\"\npublication = \"refused\"\n\
                 [[tables]]\nname = \"public.t\"\n"
            ),
        )
        .unwrap();
        for args in [
            &["init"][..],
            &["sync", "--until-caught-up"],
            &["copy", "--from", "staging", "--to", "production"],
            &["status"],
            &["verify"],
        ] {
            let out = Command::new(env!("CARGO_BIN_EXE_stagingprop"))
                .arg("--config")
                .arg(&config)
                .args(args)
                .env("STAGINGPROP_TEST_PW", "not the password")
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(3),
                "{case}: `{}` exits 3:\n{err}",
                args.join(" ")
            );
            assert!(
                err.contains(says),
                "{case}: `{}` says {says:?}:\n{err}",
                args.join(" ")
            );
            assert!(
                !err.contains("not the password"),
                "{case}: the password leaked:\n{err}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
