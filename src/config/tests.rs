//! The config file's tests: parsing, validation, connection strings.

use std::time::Duration;

use super::*;

const MINIMAL_DBS: &str = r#"
[staging]
url = "host=127.0.0.1 port=5432 dbname=staging user=stagingprop"
[production]
url = "postgres://stagingprop@127.0.0.1:5433/production"
"#;

const ONE_TABLE: &str = r#"
[[tables]]
name = "public.catentry"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(text, "test.toml")
}

fn with_dbs(rest: &str) -> Result<Config, ConfigError> {
    parse(&format!("{MINIMAL_DBS}\n{rest}"))
}

fn with_tables(rest: &str) -> Result<Config, ConfigError> {
    parse(&format!("{MINIMAL_DBS}\n{ONE_TABLE}\n{rest}"))
}

fn error_text(result: Result<Config, ConfigError>) -> String {
    match result {
        Ok(config) => panic!("expected an error, got {config:#?}"),
        Err(err) => err.to_string(),
    }
}

fn assert_error(result: Result<Config, ConfigError>, needles: &[&str]) {
    let text = error_text(result);
    for needle in needles {
        assert!(text.contains(needle), "{needle:?} not in error: {text}");
    }
}

/// The configuration sample of the design (its shape: connections, slot, tables, references).
const CONFIG_SAMPLE: &str = r#"
# stagingprop.toml
[staging]
url = "host=127.0.0.1 port=5432 dbname=staging user=stagingprop"   # libpq key=value or postgres:// URL
password_env = "STAGING_PASSWORD"        # or password_file = "..."; never in the file itself
[production]
url = "postgres://stagingprop@127.0.0.1:5433/production"
password_file = "/run/secrets/production"

[sync]
slot = "stagingprop"          # logical replication slot on staging
publication = "stagingprop"   # publication on staging, created by `init` from the table list
batch_max_rows = 20000
batch_max_delay_ms = 100

[[tables]]                    # the staging-managed tables, parents and children alike
name = "public.catentry"
key = { rule = "remap-on-conflict", sequence = "public.catentry_seq" }
on_conflict = "error"         # error | skip | overwrite

[[tables]]
name = "public.catentdesc"    # its catentry_id follows catentry's mapping through the declared FK

[[references]]                # a column that holds a key without a declared foreign key
column = "public.attrval.catentry_id"
table = "public.catentry"
"#;

#[test]
fn design_sample_parses() {
    let config = parse(CONFIG_SAMPLE).unwrap();
    assert_eq!(config.staging.section, "staging");
    assert_eq!(
        config.staging.password,
        PasswordSource::Env("STAGING_PASSWORD".into())
    );
    assert_eq!(config.staging.sslmode, SslMode::Prefer);
    assert_eq!(config.staging.connect_timeout_secs, 10);
    assert_eq!(
        config.production.password,
        PasswordSource::File("/run/secrets/production".into())
    );
    assert_eq!(config.sync, SyncConfig::default());
    assert_eq!(config.tables.len(), 2);
    let catentry = &config.tables[0];
    assert_eq!(catentry.name, TableName::new("public", "catentry"));
    assert_eq!(
        catentry.key,
        KeyRule::RemapOnConflict {
            source: KeySource::Sequence(TableName::new("public", "catentry_seq"))
        }
    );
    assert_eq!(catentry.on_conflict, ConflictPolicy::Error);
    assert!(catentry.copy);
    assert_eq!(catentry.files, None);
    let catentdesc = config
        .table(&TableName::new("public", "catentdesc"))
        .unwrap();
    assert_eq!(catentdesc.key, KeyRule::Identity);
    assert_eq!(
        config.references,
        vec![ReferenceConfig {
            column: "public.attrval.catentry_id".parse().unwrap(),
            table: TableName::new("public", "catentry"),
        }]
    );
    assert!(config.table(&TableName::new("public", "orders")).is_none());
}

#[test]
fn example_file_parses() {
    let config = parse(include_str!("../../stagingprop.example.toml")).unwrap();
    assert!(config.tables.len() >= 5);
    assert!(config.tables.iter().any(|t| t.files.is_some() && !t.copy));
    assert!(config.spool.is_some());
    for rule in [
        "identity",
        "remap-on-conflict",
        "allocate",
        "offset",
        "natural",
    ] {
        assert!(
            config.tables.iter().any(|t| t.key.as_str() == rule),
            "example lacks rule {rule}"
        );
    }
}

#[test]
fn spool_section() {
    let config = with_tables("").unwrap();
    assert_eq!(config.spool, None);
    let config =
        with_tables("[spool]\ndir = \"/var/spool/stagingprop\"\nmax_bytes = 1000000000\n").unwrap();
    let spool = config.spool.unwrap();
    assert_eq!(spool.dir, PathBuf::from("/var/spool/stagingprop"));
    assert_eq!(spool.max_bytes, 1_000_000_000);
    assert_eq!(spool.retain_secs, DEFAULT_SPOOL_RETAIN_SECS);
    assert_eq!(spool.segment_bytes, DEFAULT_SPOOL_SEGMENT_BYTES);
    for (text, expected) in [
        ("[spool]\nmax_bytes = 5\n", "needs dir"),
        ("[spool]\ndir = \"/x\"\nmax_bytes = 0\n", "spool.max_bytes"),
        (
            "[spool]\ndir = \"/x\"\nmax_bytes = 10\n",
            "smaller than one segment",
        ),
        ("[spool]\ndir = \"/x\"\nsize = 1\n", "size"),
    ] {
        let err = error_text(with_tables(text));
        assert!(err.contains(expected), "{text}: {err}");
    }
}

#[test]
fn defaults() {
    let config = with_tables("").unwrap();
    assert_eq!(config.sync.slot, "stagingprop");
    assert_eq!(config.sync.publication, "stagingprop");
    assert_eq!(config.sync.batch_max_rows, 20_000);
    assert_eq!(config.sync.batch_max_bytes, 64 * 1024 * 1024);
    assert_eq!(config.sync.batch_max_delay_ms, 100);
    assert_eq!(config.sync.batch_linger_ms, 3);
    assert_eq!(config.sync.heartbeat_interval_secs, 10);
    assert_eq!(config.sync.status_interval_secs, 10);
    assert_eq!(config.sync.receive_timeout_secs, 60);
    assert!(!config.sync.failover);
    assert_eq!(config.staging.password, PasswordSource::None);
    assert_eq!(config.production.sslmode, SslMode::Prefer);
    assert_eq!(config.production.sslrootcert, None);
    assert!(config.references.is_empty());
}

#[test]
fn full_valid_example() {
    let config = with_dbs(
        r#"
[sync]
slot = "shop_1"
publication = "shop_pub"
batch_max_rows = 500
batch_max_bytes = 1048576
batch_max_delay_ms = 0
batch_linger_ms = 5
heartbeat_interval_secs = 30
status_interval_secs = 5
receive_timeout_secs = 20
failover = true

[[tables]]
name = "catentry"
key = { rule = "allocate", keys_table = "public.keys", keys_name = "catentry" }
on_conflict = "skip"

[[tables]]
name = '"My Schema"."Prices"'
key = { rule = "offset", offset = -1000000 }
on_conflict = "overwrite"

[[tables]]
name = "Public.Member"
key = { rule = "natural", columns = ["partnumber", "MEMBER_ID"], sequence = "member_seq" }

[[tables]]
name = "public.managedfile"
copy = false
files = { dir = "/srv/assets", path_column = "filename", content_column = "content" }
key = { rule = "identity" }

[[references]]
column = "public.attrval.catentry_id"
table = "catentry"
"#,
    )
    .unwrap();
    assert_eq!(config.sync.slot, "shop_1");
    assert_eq!(config.sync.receive_timeout_secs, 20);
    assert!(config.sync.failover);
    assert_eq!(config.sync.batch_max_delay_ms, 0);
    assert_eq!(config.sync.batch_linger_ms, 5);
    assert_eq!(config.sync.heartbeat_interval_secs, 30);
    assert_eq!(
        config.tables[0].key,
        KeyRule::Allocate {
            source: KeySource::KeysTable {
                table: TableName::new("public", "keys"),
                name: "catentry".into()
            }
        }
    );
    assert_eq!(config.tables[0].on_conflict, ConflictPolicy::Skip);
    assert_eq!(config.tables[1].name, TableName::new("My Schema", "Prices"));
    assert_eq!(config.tables[1].name.to_string(), r#""My Schema"."Prices""#);
    assert_eq!(config.tables[1].key, KeyRule::Offset { offset: -1_000_000 });
    assert_eq!(config.tables[2].name, TableName::new("public", "member"));
    assert_eq!(
        config.tables[2].key,
        KeyRule::Natural {
            columns: vec!["partnumber".into(), "member_id".into()],
            source: KeySource::Sequence(TableName::new("public", "member_seq")),
        }
    );
    let files = config.tables[3].files.as_ref().unwrap();
    assert_eq!(files.dir, PathBuf::from("/srv/assets"));
    assert_eq!(files.path_column, "filename");
    assert!(!config.tables[3].copy);
    assert_eq!(
        config.references[0].table,
        TableName::new("public", "catentry")
    );
}

#[test]
fn table_names_follow_sql_rules() {
    let parse_table = |s: &str| s.parse::<TableName>();
    assert_eq!(
        parse_table("catentry").unwrap(),
        TableName::new("public", "catentry")
    );
    assert_eq!(
        parse_table("Shop.CatEntry").unwrap(),
        TableName::new("shop", "catentry")
    );
    assert_eq!(
        parse_table(r#""My Schema"."T""#).unwrap(),
        TableName::new("My Schema", "T")
    );
    assert_eq!(
        parse_table(r#"public."a""b.c""#).unwrap(),
        TableName::new("public", "a\"b.c")
    );
    assert_eq!(
        parse_table("_x$1").unwrap(),
        TableName::new("public", "_x$1")
    );
    assert_eq!(
        TableName::new("My Schema", "T").to_string(),
        r#""My Schema"."T""#
    );
    assert_eq!(
        TableName::new("public", "catentry").to_string(),
        "public.catentry"
    );
    assert_eq!(
        TableName::new("Ünïcode", "Order Lines").to_string(),
        r#"Ünïcode."Order Lines""#
    );
    for bad in [
        "",
        "a.b.c",
        "a..b",
        ".a",
        "a.",
        "1abc",
        "my table",
        r#""unterminated"#,
        r#""""#,
        r#""a"b"#,
        "a-b",
    ] {
        assert!(parse_table(bad).is_err(), "{bad:?} should not parse");
    }
    assert!(parse_table(&"x".repeat(64)).is_err());
    assert!(parse_table(&"x".repeat(63)).is_ok());

    let column: ColumnName = "public.attrval.CATENTRY_ID".parse().unwrap();
    assert_eq!(column.table, TableName::new("public", "attrval"));
    assert_eq!(column.column, "catentry_id");
    assert_eq!(column.to_string(), "public.attrval.catentry_id");
    assert!("attrval.catentry_id".parse::<ColumnName>().is_err());
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    let text = error_text(with_tables("[sync]\nslot = \"s\"\nbatch_rows = 5\n"));
    assert!(text.contains("batch_rows"), "{text}");
    assert!(text.contains("line 13"), "{text}");
    assert!(text.starts_with("test.toml: "), "{text}");

    assert_error(with_tables("[colour]\nx = 1\n"), &["colour"]);
    assert_error(
        parse(&format!(
            "[staging]\nurl = \"host=a\"\nuser = \"x\"\n[production]\nurl = \"host=b\"\n{ONE_TABLE}"
        )),
        &["user", "line 3"],
    );
    assert_error(
        with_dbs("[[tables]]\nname = \"t\"\nkey = { rule = \"identity\", seq = \"s\" }\n"),
        &["seq"],
    );
    assert_error(
        with_dbs(
            "[[tables]]\nname = \"t\"\nfiles = { dir = \"/d\", path_column = \"p\", content_column = \"c\", mode = 1 }\n",
        ),
        &["mode"],
    );
    assert_error(
        with_tables("[[references]]\ncolumn = \"a.b.c\"\ntable = \"catentry\"\nfk = true\n"),
        &["fk"],
    );
    assert_error(
        with_dbs("[[tables]]\nname = \"t\"\nkey = { rule = \"renumber\" }\n"),
        &["renumber", "remap-on-conflict"],
    );
    assert_error(
        with_dbs("[[tables]]\nname = \"t\"\non_conflict = \"ignore\"\n"),
        &["ignore", "overwrite"],
    );
}

#[test]
fn missing_sections_and_urls() {
    assert_error(
        parse(&format!("[production]\nurl = \"host=b\"\n{ONE_TABLE}")),
        &["[staging]", "missing"],
    );
    assert_error(
        parse(&format!("[staging]\nurl = \"host=b\"\n{ONE_TABLE}")),
        &["[production]", "missing"],
    );
    assert_error(
        parse(&format!(
            "[staging]\npassword_env = \"X\"\n[production]\nurl = \"host=b\"\n{ONE_TABLE}"
        )),
        &["staging.url", "missing"],
    );
    assert_error(
        parse(&format!(
            "[staging]\nurl = \"  \"\n[production]\nurl = \"host=b\"\n{ONE_TABLE}"
        )),
        &["staging.url", "empty"],
    );
}

#[test]
fn inline_passwords_are_refused_without_echoing_them() {
    let secret = "hunter2secret";
    let cases = [
        format!(
            "[staging]\nurl = \"host=a\"\npassword = \"{secret}\"\n[production]\nurl = \"host=b\"\n"
        ),
        format!("[staging]\nurl = \"host=a password={secret}\"\n[production]\nurl = \"host=b\"\n"),
        format!(
            "[staging]\nurl = \"host=a password='{secret} x'\"\n[production]\nurl = \"host=b\"\n"
        ),
        format!(
            "[staging]\nurl = \"postgres://u:{secret}@h/db\"\n[production]\nurl = \"host=b\"\n"
        ),
        format!(
            "[staging]\nurl = \"postgresql://u@h/db?password={secret}\"\n[production]\nurl = \"host=b\"\n"
        ),
    ];
    for case in cases {
        let text = error_text(parse(&format!("{case}{ONE_TABLE}")));
        assert!(
            text.contains(
                "passwords are never read from the config file: set password_env or password_file in [staging]"
            ),
            "{text}"
        );
        assert!(!text.contains(secret), "password leaked: {text}");
    }
    // The production section is named when it is production's.
    let text = error_text(parse(&format!(
        "[staging]\nurl = \"host=a\"\n[production]\nurl = \"host=b\"\npassword = 5\n{ONE_TABLE}"
    )));
    assert!(text.contains("in [production]"), "{text}");
    // A syntax error on a line holding a password does not print the line.
    let text = error_text(parse(&format!(
        "[staging]\nurl = \"host=a\"\npassword = \"{secret}\n"
    )));
    assert!(text.contains("line 3"), "{text}");
    assert!(!text.contains(secret), "password leaked: {text}");
}

#[test]
fn both_password_sources_is_an_error() {
    assert_error(
        parse(&format!(
            "[staging]\nurl = \"host=a\"\npassword_env = \"P\"\npassword_file = \"/p\"\n[production]\nurl = \"host=b\"\n{ONE_TABLE}"
        )),
        &["[staging]", "password_env", "password_file", "only one"],
    );
    assert_error(
        parse(&format!(
            "[staging]\nurl = \"host=a\"\npassword_env = \"\"\n[production]\nurl = \"host=b\"\n{ONE_TABLE}"
        )),
        &["staging.password_env"],
    );
}

#[test]
fn duplicate_tables_are_named() {
    assert_error(
        with_dbs(
            "[[tables]]\nname = \"catentry\"\n[[tables]]\nname = \"x\"\n[[tables]]\nname = \"public.CATENTRY\"\n",
        ),
        &["public.catentry", "listed twice", "tables[2]"],
    );
}

#[test]
fn tables_are_required_and_named() {
    assert_error(with_dbs(""), &["no managed tables", "[[tables]]"]);
    assert_error(
        with_dbs("[[tables]]\ncopy = false\n"),
        &["tables[0]", "has no name"],
    );
    assert_error(
        with_dbs("[[tables]]\nname = \"a.b.c\"\n"),
        &["a.b.c", "schema.table"],
    );
}

#[test]
fn references_must_point_at_managed_tables() {
    assert_error(
        with_tables(
            "[[references]]\ncolumn = \"public.attrval.catentry_id\"\ntable = \"public.orders\"\n",
        ),
        &[
            "references[0].table",
            "public.orders",
            "not a managed table",
        ],
    );
    assert_error(
        with_tables(
            "[[references]]\ncolumn = \"attrval.catentry_id\"\ntable = \"public.catentry\"\n",
        ),
        &["schema.table.column"],
    );
    assert_error(
        with_tables("[[references]]\ncolumn = \"catentry_id\"\ntable = \"public.catentry\"\n"),
        &["schema.table.column"],
    );
    assert_error(
        with_tables("[[references]]\ntable = \"public.catentry\"\n"),
        &["references[0]", "has no column"],
    );
    assert_error(
        with_tables("[[references]]\ncolumn = \"public.attrval.catentry_id\"\n"),
        &["references[0]", "has no table"],
    );
    assert_error(
        with_tables(
            "[[references]]\ncolumn = \"public.attrval.catentry_id\"\ntable = \"catentry\"\n\
             [[references]]\ncolumn = \"public.ATTRVAL.catentry_id\"\ntable = \"catentry\"\n",
        ),
        &["references[1].column", "listed twice"],
    );
}

#[test]
fn slot_and_publication_names() {
    for good in ["stagingprop", "s_1", "_", &"a".repeat(63)] {
        assert!(check_slot_name(good).is_ok(), "{good}");
    }
    assert_error(
        with_tables("[sync]\nslot = \"Staging\"\n"),
        &["sync.slot", "\"Staging\""],
    );
    assert_error(with_tables("[sync]\nslot = \"a-b\"\n"), &["sync.slot"]);
    assert_error(
        with_tables("[sync]\nslot = \"\"\n"),
        &["sync.slot", "empty"],
    );
    assert_error(
        with_tables(&format!("[sync]\nslot = \"{}\"\n", "a".repeat(64))),
        &["sync.slot", "63 bytes"],
    );
    assert_error(
        with_tables("[sync]\npublication = \"my pub\"\n"),
        &["sync.publication"],
    );
}

#[test]
fn sync_limits() {
    assert_error(
        with_tables("[sync]\nbatch_max_rows = 0\n"),
        &["sync.batch_max_rows", "at least 1"],
    );
    assert_error(
        with_tables("[sync]\nbatch_max_bytes = 0\n"),
        &["sync.batch_max_bytes"],
    );
    assert_error(
        with_tables("[sync]\nheartbeat_interval_secs = 0\n"),
        &["sync.heartbeat_interval_secs"],
    );
    assert_error(
        with_tables("[sync]\nstatus_interval_secs = 0\n"),
        &["sync.status_interval_secs"],
    );
    assert_error(
        with_tables("[sync]\nreceive_timeout_secs = 0\n"),
        &["sync.receive_timeout_secs"],
    );
    assert_error(
        with_tables("[sync]\nbatch_max_rows = -1\n"),
        &["batch_max_rows"],
    );
}

fn key(spec: &str) -> Result<Config, ConfigError> {
    with_dbs(&format!("[[tables]]\nname = \"public.t\"\nkey = {spec}\n"))
}

#[test]
fn key_rule_combinations() {
    let rule = |spec: &str| key(spec).unwrap().tables[0].key.clone();
    assert_eq!(rule("{ rule = \"identity\" }"), KeyRule::Identity);
    assert_eq!(
        rule("{ rule = \"remap-on-conflict\", keys_table = \"keys\", keys_name = \"t\" }"),
        KeyRule::RemapOnConflict {
            source: KeySource::KeysTable {
                table: TableName::new("public", "keys"),
                name: "t".into()
            }
        }
    );
    assert_eq!(
        rule("{ rule = \"allocate\", sequence = \"public.x_seq\" }"),
        KeyRule::Allocate {
            source: KeySource::Sequence(TableName::new("public", "x_seq"))
        }
    );
    assert_eq!(
        rule("{ rule = \"offset\", offset = 5 }"),
        KeyRule::Offset { offset: 5 }
    );

    for (spec, needles) in [
        (
            "{ rule = \"identity\", sequence = \"s\" }",
            &["identity", "takes no sequence"][..],
        ),
        ("{ rule = \"identity\", offset = 3 }", &["takes no offset"]),
        (
            "{ rule = \"identity\", columns = [\"a\"] }",
            &["takes no columns"],
        ),
        ("{ rule = \"allocate\" }", &["allocate", "needs a source"]),
        (
            "{ rule = \"remap-on-conflict\" }",
            &["remap-on-conflict", "needs a source"],
        ),
        (
            "{ rule = \"natural\", columns = [\"a\"] }",
            &["natural", "needs a source"],
        ),
        (
            "{ rule = \"allocate\", sequence = \"s\", keys_table = \"k\", keys_name = \"n\" }",
            &["not both"],
        ),
        (
            "{ rule = \"allocate\", keys_table = \"k\" }",
            &["needs keys_name"],
        ),
        (
            "{ rule = \"allocate\", keys_name = \"n\" }",
            &["needs keys_table"],
        ),
        (
            "{ rule = \"allocate\", keys_table = \"k\", keys_name = \"\" }",
            &["keys_name is empty"],
        ),
        (
            "{ rule = \"allocate\", sequence = \"s\", offset = 1 }",
            &["takes no offset"],
        ),
        (
            "{ rule = \"allocate\", sequence = \"s\", columns = [\"a\"] }",
            &["takes no columns"],
        ),
        ("{ rule = \"offset\" }", &["needs offset"]),
        ("{ rule = \"offset\", offset = 0 }", &["identity"]),
        (
            "{ rule = \"offset\", offset = 1, sequence = \"s\" }",
            &["takes no sequence"],
        ),
        (
            "{ rule = \"natural\", sequence = \"s\" }",
            &["needs columns"],
        ),
        (
            "{ rule = \"natural\", sequence = \"s\", columns = [] }",
            &["needs columns"],
        ),
        (
            "{ rule = \"natural\", sequence = \"s\", columns = [\"a\", \"A\"] }",
            &["listed twice"],
        ),
        (
            "{ rule = \"natural\", sequence = \"s\", columns = [\"a.b\"] }",
            &["single column"],
        ),
        (
            "{ rule = \"natural\", sequence = \"s\", columns = [\"a\"], offset = 1 }",
            &["takes no offset"],
        ),
        ("{ sequence = \"s\" }", &["has no rule"]),
    ] {
        let text = error_text(key(spec));
        assert!(text.contains("tables[0].key (public.t)"), "{spec}: {text}");
        for needle in needles {
            assert!(text.contains(needle), "{spec}: {needle:?} not in {text}");
        }
    }
}

#[test]
fn files_tables() {
    let files = |spec: &str| {
        with_dbs(&format!(
            "[[tables]]\nname = \"public.f\"\nfiles = {spec}\n"
        ))
    };
    assert_error(
        files("{ path_column = \"p\", content_column = \"c\" }"),
        &["needs dir"],
    );
    assert_error(
        files("{ dir = \"/d\", content_column = \"c\" }"),
        &["needs path_column"],
    );
    assert_error(
        files("{ dir = \"/d\", path_column = \"p\" }"),
        &["needs content_column"],
    );
    assert_error(
        files("{ dir = \"/d\", path_column = \"p\", content_column = \"P\" }"),
        &["the same column"],
    );
}

fn db(url_and_more: &str) -> Result<Config, ConfigError> {
    parse(&format!(
        "[staging]\n{url_and_more}\n[production]\nurl = \"host=b\"\n{ONE_TABLE}"
    ))
}

#[test]
fn urls_must_parse_and_name_a_host() {
    assert_error(
        db("url = \"host=a port=notaport\""),
        &["staging.url", "does not parse"],
    );
    assert_error(
        db("url = \"host=a bogus=1\""),
        &["staging.url", "does not parse"],
    );
    assert_error(db("url = \"host a\""), &["staging.url"]);
    assert_error(db("url = \"host='a\""), &["staging.url", "unterminated"]);
    assert_error(db("url = \"dbname=x\""), &["staging.url", "no host"]);
    assert_error(db("url = \"postgres:///x\""), &["staging.url", "no host"]);
    assert_error(
        parse(&format!(
            "[staging]\nurl = \"host=a\"\n[production]\nurl = \"postgres://h:99999/x\"\n{ONE_TABLE}"
        )),
        &["production.url"],
    );
    assert!(db("url = \"postgresql://u@h1:5432,h2:5433/db?connect_timeout=3\"").is_ok());
}

#[test]
fn sslmode_in_field_or_url() {
    let staging = |s: &str| db(s).map(|c| c.staging);
    assert_eq!(
        staging("url = \"host=a\"\nsslmode = \"require\"")
            .unwrap()
            .sslmode,
        SslMode::Require
    );
    assert_eq!(
        staging("url = \"host=a sslmode=disable\"").unwrap().sslmode,
        SslMode::Disable
    );
    let verified =
        staging("url = \"postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem\"")
            .unwrap();
    assert_eq!(verified.sslmode, SslMode::VerifyFull);
    assert_eq!(verified.sslrootcert, Some(PathBuf::from("/etc/ca.pem")));
    let verified = staging(
        "url = \"host=a sslmode=verify-ca\"\nsslrootcert = \"ca.pem\"\nsslmode = \"verify-ca\"",
    )
    .unwrap();
    assert_eq!(verified.sslmode, SslMode::VerifyCa);

    assert_error(
        db("url = \"host=a sslmode=disable\"\nsslmode = \"require\""),
        &["staging.sslmode", "conflicts", "one place"],
    );
    assert_error(
        db("url = \"host=a\"\nsslmode = \"verify-full\""),
        &["staging.sslmode", "sslrootcert"],
    );
    assert_error(db("url = \"host=a sslmode=verify-ca\""), &["sslrootcert"]);
    assert_error(
        db("url = \"host=a\"\nsslmode = \"require\"\nsslrootcert = \"/ca.pem\""),
        &["staging.sslrootcert", "verify-full"],
    );
    assert_error(
        db(
            "url = \"host=a sslrootcert=/x.pem\"\nsslmode = \"verify-full\"\nsslrootcert = \"/y.pem\"",
        ),
        &["staging.sslrootcert", "conflicts"],
    );
    assert_error(
        db("url = \"host=a sslmode=allow\""),
        &["allow", "not supported"],
    );
    assert_error(
        db("url = \"host=a\"\nsslmode = \"strict\""),
        &["strict", "verify-full"],
    );
}

#[test]
fn connect_timeout_in_field_or_url() {
    let timeout = |s: &str| db(s).map(|c| c.staging.connect_timeout_secs);
    assert_eq!(timeout("url = \"host=a\"").unwrap(), 10);
    assert_eq!(timeout("url = \"host=a connect_timeout=4\"").unwrap(), 4);
    assert_eq!(
        timeout("url = \"host=a\"\nconnect_timeout_secs = 0").unwrap(),
        0
    );
    assert_error(
        db("url = \"host=a connect_timeout=4\"\nconnect_timeout_secs = 5"),
        &["staging.connect_timeout_secs", "conflicts"],
    );
}

fn db_config(url: &str, password: PasswordSource) -> DbConfig {
    DbConfig {
        section: "staging".into(),
        url: url.into(),
        password,
        sslmode: SslMode::VerifyFull,
        sslrootcert: Some("/ca.pem".into()),
        sslcert: None,
        sslkey: None,
        passfile: None,
        connect_timeout_secs: 7,
    }
}

#[test]
fn pg_config_and_describe() {
    let db = db_config(
        "host=db.example port=6543 dbname=shop user=sp sslmode=verify-full sslrootcert=/ca.pem",
        PasswordSource::None,
    );
    let pg = crate::pg::connect::driver_config(&db).unwrap();
    assert_eq!(pg.get_dbname(), Some("shop"));
    assert_eq!(pg.get_user(), Some("sp"));
    assert_eq!(pg.get_ports(), &[6543]);
    assert_eq!(pg.get_password(), None);
    assert_eq!(pg.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
    assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(7)));
    assert_eq!(pg.get_application_name(), Some("stagingprop"));
    assert_eq!(
        db.describe(),
        "host=db.example port=6543 dbname=shop user=sp sslmode=verify-full"
    );

    let url_db = DbConfig {
        sslmode: SslMode::Disable,
        sslrootcert: None,
        sslcert: None,
        sslkey: None,
        passfile: None,
        connect_timeout_secs: 0,
        ..db_config(
            "postgres://sp@h1:5432,h2:5433/shop?application_name=mine",
            PasswordSource::None,
        )
    };
    let pg = crate::pg::connect::driver_config(&url_db).unwrap();
    assert_eq!(pg.get_application_name(), Some("mine"));
    assert_eq!(pg.get_connect_timeout(), None);
    assert_eq!(pg.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
    assert_eq!(
        url_db.describe(),
        "host=h1,h2 port=5432,5433 dbname=shop user=sp sslmode=disable"
    );

    let quoted = db_config(r"host=a dbname='my shop' user='o\'k'", PasswordSource::None);
    let pg = crate::pg::connect::driver_config(&quoted).unwrap();
    assert_eq!(pg.get_user(), Some("o'k"));
    assert_eq!(pg.get_dbname(), Some("my shop"));

    let leaky = db_config("postgres://u:topsecret@h/db", PasswordSource::None);
    let text = crate::pg::connect::driver_config(&leaky)
        .unwrap_err()
        .to_string();
    assert!(!text.contains("topsecret"), "{text}");
    assert!(!leaky.describe().contains("topsecret"));
}

#[test]
fn passwords_from_env() {
    // A variable name no other test uses, so parallel tests cannot race on it.
    let var = "STAGINGPROP_CONFIG_TEST_PASSWORD_ENV";
    let db = db_config("host=a", PasswordSource::Env(var.into()));
    // SAFETY: no other code in the test binary reads or writes this variable.
    unsafe { std::env::remove_var(var) };
    let text = db.resolve_password().unwrap_err().to_string();
    assert!(text.contains(var) && text.contains("not set"), "{text}");
    unsafe { std::env::set_var(var, "") };
    let text = db.resolve_password().unwrap_err().to_string();
    assert!(text.contains(var) && text.contains("empty"), "{text}");
    unsafe { std::env::set_var(var, "s3cret\n") };
    assert_eq!(db.resolve_password().unwrap().as_deref(), Some("s3cret\n"));
    assert_eq!(
        crate::pg::connect::driver_config(&db)
            .unwrap()
            .get_password(),
        Some(&b"s3cret\n"[..])
    );
    unsafe { std::env::remove_var(var) };
    assert_eq!(
        db_config("host=a", PasswordSource::None)
            .resolve_password()
            .unwrap(),
        None
    );
}

#[test]
fn passwords_from_files() {
    let dir = std::env::temp_dir().join(format!("stagingprop-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, contents: &str| {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    };
    let read = |path: PathBuf| db_config("host=a", PasswordSource::File(path)).resolve_password();

    assert_eq!(read(write("lf", "pw\n")).unwrap().as_deref(), Some("pw"));
    assert_eq!(
        read(write("crlf", "pw\r\n")).unwrap().as_deref(),
        Some("pw")
    );
    assert_eq!(
        read(write("two", "pw\n\n")).unwrap().as_deref(),
        Some("pw\n")
    );
    assert_eq!(
        read(write("bare", " pw ")).unwrap().as_deref(),
        Some(" pw ")
    );
    let text = read(write("empty", "\n")).unwrap_err().to_string();
    assert!(
        text.contains("empty") && text.contains("password_file"),
        "{text}"
    );
    let missing = dir.join("missing");
    let text = read(missing.clone()).unwrap_err().to_string();
    assert!(text.contains(&missing.display().to_string()), "{text}");
    assert!(text.contains("[staging] password_file"), "{text}");

    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn load_reads_files_and_rebases_relative_paths() {
    let dir = std::env::temp_dir().join(format!("stagingprop-config-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("stagingprop.toml");
    std::fs::write(
        &path,
        "[staging]\nurl = \"host=a\"\npassword_file = \"secrets/staging\"\n\
         [production]\nurl = \"host=b\"\nsslmode = \"verify-full\"\nsslrootcert = \"/abs/ca.pem\"\n\
         [[tables]]\nname = \"f\"\nfiles = { dir = \"assets\", path_column = \"p\", content_column = \"c\" }\n",
    )
    .unwrap();
    let config = Config::load(&path).unwrap();
    assert_eq!(
        config.staging.password,
        PasswordSource::File(dir.join("secrets/staging"))
    );
    assert_eq!(
        config.production.sslrootcert,
        Some(PathBuf::from("/abs/ca.pem"))
    );
    assert_eq!(
        config.tables[0].files.as_ref().unwrap().dir,
        dir.join("assets")
    );

    let missing = dir.join("nope.toml");
    let text = Config::load(&missing).unwrap_err().to_string();
    assert!(
        text.contains("cannot read config file") && text.contains("nope.toml"),
        "{text}"
    );

    std::fs::write(&path, "[staging\n").unwrap();
    let text = Config::load(&path).unwrap_err().to_string();
    assert!(
        text.contains("stagingprop.toml") && text.contains("line 1"),
        "{text}"
    );

    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn partial_tables_and_scopes() {
    let config = with_dbs(
        r#"
[[tables]]
name = "public.offer"
filter = " storeent_id IN (10001, 10002) "
columns = ["price", "published"]
[[tables]]
name = "public.catentry"
exclude_columns = ["merchant_note"]
[scopes.store-1]
slot = "store_one"
[scopes.store-1.filters]
"public.offer" = "storeent_id = 1"
[scopes.site]
"#,
    )
    .unwrap();
    let offer = &config.tables[0];
    assert_eq!(
        offer.filter.as_deref(),
        Some("storeent_id IN (10001, 10002)")
    );
    assert!(offer.columns.includes("price", false));
    assert!(
        offer.columns.includes("offer_id", true),
        "keys are always managed"
    );
    assert!(!offer.columns.includes("merchant_note", false));
    assert!(!config.tables[1].columns.includes("merchant_note", false));
    assert!(config.tables[1].columns.includes("partnumber", false));
    assert_eq!(
        config
            .scopes
            .iter()
            .map(|s| (s.name.as_str(), s.slot.as_str(), s.publication.as_str()))
            .collect::<Vec<_>>(),
        vec![
            ("site", "stagingprop_site", "stagingprop_site"),
            ("store-1", "store_one", "stagingprop_store_1"),
        ]
    );
    let scoped = config.scoped("store-1").unwrap();
    assert_eq!(scoped.sync.slot, "store_one");
    assert_eq!(scoped.tables[0].filter.as_deref(), Some("storeent_id = 1"));
    assert_eq!(scoped.scope.as_deref(), Some("store-1"));
    assert_error(
        config.scoped("nope").map(|_| config.clone()),
        &["store-1", "site"],
    );
}

#[test]
fn bad_partial_tables_and_scopes_are_named() {
    assert_error(
        with_dbs("[[tables]]\nname = \"public.t\"\ncolumns = [\"a\"]\nexclude_columns = [\"b\"]\n"),
        &["public.t", "keep one"],
    );
    assert_error(
        with_dbs("[[tables]]\nname = \"public.t\"\ncolumns = []\n"),
        &["columns", "empty"],
    );
    assert_error(
        with_dbs("[[tables]]\nname = \"public.t\"\nfilter = \"a = 1; DROP TABLE t\"\n"),
        &["filter", "';'"],
    );
    assert_error(
        with_tables("[scopes.a.filters]\n\"public.other\" = \"x = 1\"\n"),
        &["public.other", "not a managed table"],
    );
    assert_error(with_tables("[scopes.A]\n"), &["scopes.A", "lower-case"]);
    assert_error(
        with_tables("[scopes.a]\nslot = \"stagingprop\"\n"),
        &["scopes.a.slot", "[sync]"],
    );
}

#[test]
fn a_stream_section_gets_names_derived_from_the_slot() {
    let config = with_tables("[stream]\nurl = \"nats://127.0.0.1:4222\"").unwrap();
    let stream = config.stream.unwrap();
    assert_eq!(stream.name, "STAGINGPROP");
    assert_eq!(stream.subject, "stagingprop.stagingprop");
    assert_eq!(stream.consumer, "stagingprop");
    assert_eq!(stream.chunk_bytes, DEFAULT_STREAM_CHUNK_BYTES);
    assert_eq!(stream.password, PasswordSource::None);
}

#[test]
fn stream_credentials_never_come_from_the_file_or_the_url() {
    assert_error(
        with_tables("[stream]\nurl = \"nats://127.0.0.1:4222\"\npassword = \"x\""),
        &["stream.password", "password_env"],
    );
    assert_error(
        with_tables("[stream]\nurl = \"nats://user:pw@127.0.0.1:4222\""),
        &["stream.url", "without credentials"],
    );
    assert_error(
        with_tables("[stream]\nurl = \"http://127.0.0.1:4222\""),
        &["stream.url", "nats://"],
    );
    assert_error(
        with_tables("[stream]\nname = \"S\""),
        &["stream.url", "is missing"],
    );
    assert_error(
        with_tables("[stream]\nurl = \"nats://h:1\"\nsubject = \"a.*\""),
        &["stream.subject", "wildcards"],
    );
    assert_error(
        with_tables("[stream]\nurl = \"nats://h:1\"\nchunk_bytes = 10"),
        &["stream.chunk_bytes", "1024"],
    );
}

proptest::proptest! {
    /// Issue 33: whatever a table is called, the name stagingprop stores (its display) parses
    /// back to the same name.
    #[test]
    fn every_table_name_reads_back_as_itself(
        schema in "[a-zA-Z0-9_ .\"$Üé-]{1,20}",
        name in "[a-zA-Z0-9_ .\"$Üé-]{1,20}",
    ) {
        let table = TableName::new(schema, name);
        proptest::prop_assert_eq!(table.to_string().parse::<TableName>(), Ok(table));
    }
}

#[test]
fn conflict_policies_resolve_every_kind() {
    use crate::config::Resolution;
    use crate::model::ConflictKind as K;
    let quarantine = Resolution::Quarantine {
        incomplete_row: false,
    };
    for kind in [
        K::InsertExists,
        K::UpdateMissing,
        K::DeleteMissing,
        K::UpdateUnmapped,
        K::DeleteUnmapped,
    ] {
        assert_eq!(ConflictPolicy::Error.resolve(kind, true), Resolution::Stop);
        assert_eq!(ConflictPolicy::Skip.resolve(kind, true), quarantine);
    }
    let overwrite = ConflictPolicy::Overwrite;
    assert_eq!(
        overwrite.resolve(K::DeleteMissing, false),
        Resolution::AlreadyDone
    );
    assert_eq!(
        overwrite.resolve(K::UpdateMissing, true),
        Resolution::InsertRow
    );
    assert_eq!(
        overwrite.resolve(K::UpdateMissing, false),
        Resolution::Quarantine {
            incomplete_row: true
        }
    );
    assert_eq!(overwrite.resolve(K::UpdateUnmapped, true), quarantine);
    assert_eq!(
        overwrite.resolve(K::InsertExists, true),
        Resolution::InsertRow
    );
    assert_eq!(ConflictPolicy::Skip.on_retry(), ConflictPolicy::Error);
    assert!(!ConflictPolicy::Skip.allows_one_trip() && overwrite.inserts_overwrite());
}

#[test]
fn each_edit_policy_decides_every_kind_of_change_that_meets_a_production_edit() {
    use crate::config::{EditPolicy, EditResolution as R};
    use crate::model::ConflictKind as K;
    let every = [
        K::InsertExists,
        K::UpdateOriginDiffers,
        K::UpdateMissing,
        K::DeleteOriginDiffers,
        K::DeleteMissing,
    ];
    for kind in every {
        for whole_row in [true, false] {
            assert_eq!(
                EditPolicy::ProductionWins.resolve(kind, whole_row),
                R::KeepProduction
            );
            assert_eq!(EditPolicy::Park.resolve(kind, whole_row), R::Park);
        }
    }
    let staging = EditPolicy::StagingWins;
    assert_eq!(staging.resolve(K::UpdateOriginDiffers, false), R::Apply);
    assert_eq!(staging.resolve(K::DeleteOriginDiffers, false), R::Apply);
    assert_eq!(staging.resolve(K::InsertExists, true), R::Apply);
    assert_eq!(staging.resolve(K::DeleteMissing, false), R::AlreadyDone);
    // Production deleted the row: staging's whole row goes back, a partial one waits.
    assert_eq!(staging.resolve(K::UpdateMissing, true), R::InsertRow);
    assert_eq!(staging.resolve(K::UpdateMissing, false), R::Park);
}

#[test]
fn the_guard_and_edit_policy_default_from_the_guard_section() {
    let config = with_dbs(
        "[guard]\ndefault = \"record\"\non_production_edit = \"park\"\n\
         [[tables]]\nname = \"a\"\n\
         [[tables]]\nname = \"b\"\nguard = \"refuse\"\non_production_edit = \"production-wins\"\n",
    )
    .unwrap();
    use crate::config::{EditPolicy, GuardMode};
    assert_eq!(
        (config.tables[0].guard, config.tables[0].on_production_edit),
        (GuardMode::Record, EditPolicy::Park)
    );
    assert_eq!(
        (config.tables[1].guard, config.tables[1].on_production_edit),
        (GuardMode::Refuse, EditPolicy::ProductionWins)
    );
    let plain = with_dbs("[[tables]]\nname = \"a\"\n").unwrap();
    assert_eq!(
        (plain.tables[0].guard, plain.tables[0].on_production_edit),
        (GuardMode::Off, EditPolicy::StagingWins)
    );
    let bad = with_dbs("[guard]\ndefault = \"strict\"\n[[tables]]\nname = \"a\"\n")
        .unwrap_err()
        .to_string();
    assert!(bad.contains("strict"), "{bad}");
}

#[test]
fn table_patterns_manage_a_schema_s_tables_but_the_listed_and_excluded_ones() {
    let config = with_dbs(
        r#"
[[tables]]
name = "cat.price"
on_conflict = "skip"

[[table_patterns]]
schema = "cat"
exclude = ["audit_*"]
on_conflict = "overwrite"
on_staging_drop = "drop"
"#,
    )
    .expect("a pattern");
    let found = [
        TableName::new("cat", "price"),
        TableName::new("cat", "offer"),
        TableName::new("cat", "audit_log"),
        TableName::new("public", "orders"),
        TableName::new("cat", "offer"),
    ];
    let expanded = config.with_found(&found);
    let names: Vec<String> = expanded.tables.iter().map(|t| t.name.to_string()).collect();
    assert_eq!(names, ["cat.price", "cat.offer"]);
    let offer = &expanded.tables[1];
    assert!(offer.from_pattern && offer.drop_with_staging);
    assert_eq!(offer.on_conflict, ConflictPolicy::Overwrite);
    assert_eq!(expanded.tables[0].on_conflict, ConflictPolicy::Skip);
    assert!(!expanded.tables[0].from_pattern);

    // Patterns alone are enough; each is checked.
    assert!(with_dbs("[[table_patterns]]\nschema = \"cat\"").is_ok());
    assert_error(
        with_dbs("[[table_patterns]]\nexclude = [\"x\"]"),
        &["table_patterns[0]", "has no schema"],
    );
    assert_error(
        with_dbs("[[table_patterns]]\nschema = \"cat\"\n[[table_patterns]]\nschema = \"cat\""),
        &["table_patterns[1].schema", "already has a pattern"],
    );
    assert_error(
        with_dbs("[[table_patterns]]\nschema = \"stagingprop\""),
        &["holds no staging-managed tables"],
    );
    assert_error(
        with_dbs("[[table_patterns]]\nschema = \"cat\"\non_staging_drop = \"maybe\""),
        &["on_staging_drop"],
    );
}
