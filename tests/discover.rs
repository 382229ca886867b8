//! `stagingprop discover` writes a config from staging's catalog: tried on a generated schema of
//! 500 tables in foreign-key chains (with tables it must not manage as they are, an undeclared
//! reference and a file store), and on the demo's catalogue, whose config `init` and `copy` take
//! unedited.

mod support;

use std::path::Path;
use std::process::Command;

use stagingprop::config::Config;
use support::{Scratch, clusters, fresh_db, psql, stagingprop as run};

const BIN: &str = env!("CARGO_BIN_EXE_stagingprop");

/// Runs discover into `output`: (exit code, stderr).
fn discover(staging: &str, production: &str, output: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args([
            "discover",
            "--staging",
            staging,
            "--production",
            production,
            "--output",
        ])
        .arg(output)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_schema_of_500_tables_becomes_a_config_parents_first() {
    let c = clusters();
    let staging = fresh_db(&c.staging, "discover_big");
    // 100 chains of 5 tables, each referring to the one before; created children first so the
    // catalog's own order is not the foreign keys' order.
    let mut sql = String::new();
    for chain in 0..100 {
        for link in 0..5 {
            sql.push_str(&format!(
                "CREATE TABLE t{chain}_{link} (id bigint PRIMARY KEY{}, v text);\n",
                if link == 0 {
                    String::new()
                } else {
                    format!(", parent_id bigint REFERENCES t{chain}_{}", link - 1)
                }
            ));
        }
    }
    sql.push_str(
        "CREATE TABLE history (a int, b int);
         CREATE TABLE history_full (a int, b int); ALTER TABLE history_full REPLICA IDENTITY FULL;
         CREATE TABLE note (note_id bigint PRIMARY KEY, t0_0_id bigint, body text);
         CREATE TABLE staticfile (path text PRIMARY KEY, content bytea);
         CREATE TABLE scratch_tmp (id int PRIMARY KEY);",
    );
    psql(&c.staging, &staging, &sql);
    let scratch = Scratch::new("discover-big");
    let output = scratch.0.join("stagingprop.toml");
    let staging_url = c.staging.conninfo(&staging, "postgres");
    let production_url = c.production.conninfo("postgres", "postgres");
    let (code, stderr) = discover(
        &staging_url,
        &production_url,
        &output,
        &["--exclude", "scratch_*"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("504 table(s)"), "{stderr}");
    let text = std::fs::read_to_string(&output).unwrap();
    let config = Config::load(&output).unwrap_or_else(|e| panic!("{e}\n{text}"));
    // 500 chained, history_full, note, staticfile; history commented out with what to do.
    assert_eq!(config.tables.len(), 503);
    assert!(
        text.contains("# name = \"public.history\"")
            && text.contains("ALTER TABLE public.history REPLICA IDENTITY FULL"),
        "{text}"
    );
    assert!(!text.contains("scratch_tmp"));
    let position = |name: &str| {
        config
            .tables
            .iter()
            .position(|t| t.name.name == name)
            .unwrap_or_else(|| panic!("{name} is not in the config"))
    };
    for chain in 0..100 {
        for link in 1..5 {
            assert!(
                position(&format!("t{chain}_{}", link - 1)) < position(&format!("t{chain}_{link}")),
                "t{chain}_{link} comes before its parent"
            );
        }
    }
    // The undeclared reference and the file store are suggested, commented out.
    assert!(
        text.contains("# column = \"public.note.t0_0_id\"")
            && text.contains("# table = \"public.t0_0\""),
        "{text}"
    );
    assert!(
        text.contains("# files = { dir = \"/srv/files\", path_column = \"path\", content_column = \"content\" }"),
        "{text}"
    );
    // An existing file is never overwritten.
    let (code, stderr) = discover(&staging_url, &production_url, &output, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("never overwrites"), "{stderr}");
}

#[test]
fn the_demo_catalogue_config_works_unedited_for_init_and_copy() {
    let c = clusters();
    let staging = fresh_db(&c.staging, "discover_demo");
    let production = fresh_db(&c.production, "discover_demo");
    psql(&c.staging, &staging, stagingprop::ops::demo::CATALOGUE);
    psql(&c.staging, &staging, stagingprop::ops::demo::SEED);
    psql(
        &c.production,
        &production,
        stagingprop::ops::demo::CATALOGUE,
    );
    let scratch = Scratch::new("discover-demo");
    let output = scratch.0.join("stagingprop.toml");
    let (code, stderr) = discover(
        &c.staging.conninfo(&staging, "postgres"),
        &c.production.conninfo(&production, "postgres"),
        &output,
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let (code, out, err) = run(&output, &["init", "--no-slot"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run(
        &output,
        &["copy", "--from", "staging", "--to", "production"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let count = psql(
        &c.production,
        &production,
        "SELECT count(*) FROM offerprice",
    );
    assert_eq!(count.trim(), "10000");
}
