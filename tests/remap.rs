//! Key remapping against real clusters: every rule in sync (remap-on-conflict with children
//! following, allocate from a sequence and from a KEYS table with its bound, offset, natural),
//! references from declared foreign keys and from `[[references]]`, key changes, deletes that
//! take their mapping along, and the errors an operator must see.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value as Json;
use stagingprop::config::Config;
use stagingprop::copy::{self, CopyOptions, Side};
use stagingprop::model::{Lsn, PgTimestamp};
use stagingprop::ops::init::{InitOptions, init};
use stagingprop::ops::status::{Thresholds, render, status};
use stagingprop::ops::tail::{TailOptions, tail};
use stagingprop::ops::verify::{VerifyOptions, render as render_diffs, verify};
use stagingprop::pgoutput::LogicalMessage;
use stagingprop::spool::store::SpoolWriter;
use stagingprop::sync::SyncError;
use support::{caught_up, clusters, fresh_db, init_without_slot, psql, wait_for_tail_slot};

const SCHEMA: &str = "
CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, partnumber text NOT NULL UNIQUE, name text);
CREATE TABLE catentdesc (catentry_id bigint REFERENCES catentry ON DELETE CASCADE,
  language_id int, name text, PRIMARY KEY (catentry_id, language_id));
CREATE TABLE offer (offer_id bigint PRIMARY KEY,
  catentry_id bigint NOT NULL REFERENCES catentry ON DELETE CASCADE, published bool);
CREATE TABLE offerprice (offer_id bigint REFERENCES offer ON DELETE CASCADE, currency char(3),
  price numeric(20,5), PRIMARY KEY (offer_id, currency));
CREATE TABLE catgroup (catgroup_id bigint PRIMARY KEY, identifier text NOT NULL UNIQUE,
  parent_id bigint REFERENCES catgroup, name text);
CREATE TABLE catgpenrel (catgroup_id bigint REFERENCES catgroup ON DELETE CASCADE,
  catentry_id bigint REFERENCES catentry ON DELETE CASCADE, sequence int,
  PRIMARY KEY (catgroup_id, catentry_id));
CREATE TABLE attrval (attrval_id bigint PRIMARY KEY, catentry_id bigint, value text);
CREATE TABLE promotion (promotion_id bigint PRIMARY KEY,
  catentry_id bigint REFERENCES catentry ON DELETE CASCADE, name text);
CREATE TABLE attachment (attachment_id bigint PRIMARY KEY, path text,
  catentry_id bigint REFERENCES catentry ON DELETE CASCADE);
CREATE TABLE keys (tablename text PRIMARY KEY, counter bigint NOT NULL,
  lowerbound bigint NOT NULL, upperbound bigint NOT NULL);
CREATE SEQUENCE catentry_seq START 1000000;
CREATE SEQUENCE catgroup_seq START 7000000;
CREATE SEQUENCE attrval_seq START 5000000;
";

/// How the test translates a table's staging rows into production's key space.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rule {
    Identity,
    /// Through the key map when mapped, else kept.
    RemapOnConflict,
    /// Always through the key map.
    Mapped,
    Offset(i64),
}

struct Table {
    name: &'static str,
    /// The primary key, for ordering.
    key: &'static str,
    rule: Rule,
    config: &'static str,
    /// Columns holding keys of another table.
    references: &'static [(&'static str, &'static str)],
    /// Rows production made itself (excluded from the comparison).
    production_born: &'static str,
}

const TABLES: &[Table] = &[
    Table {
        name: "catentry",
        key: "catentry_id",
        rule: Rule::RemapOnConflict,
        config: "key = { rule = \"remap-on-conflict\", sequence = \"public.catentry_seq\" }",
        references: &[],
        production_born: "partnumber LIKE 'PROD-%'",
    },
    Table {
        name: "catentdesc",
        key: "catentry_id, language_id",
        rule: Rule::Identity,
        config: "",
        references: &[("catentry_id", "catentry")],
        production_born: "name LIKE 'prod%'",
    },
    Table {
        name: "offer",
        key: "offer_id",
        rule: Rule::RemapOnConflict,
        config: "key = { rule = \"remap-on-conflict\", keys_table = \"public.keys\", keys_name = \"offer\" }",
        references: &[("catentry_id", "catentry")],
        production_born: "offer_id = 1",
    },
    Table {
        name: "offerprice",
        key: "offer_id, currency",
        rule: Rule::Identity,
        config: "",
        references: &[("offer_id", "offer")],
        production_born: "offer_id = 1",
    },
    Table {
        name: "catgroup",
        key: "catgroup_id",
        rule: Rule::Mapped,
        config: "key = { rule = \"natural\", columns = [\"identifier\"], sequence = \"public.catgroup_seq\" }",
        references: &[("parent_id", "catgroup")],
        production_born: "false",
    },
    Table {
        name: "catgpenrel",
        key: "catgroup_id, catentry_id",
        rule: Rule::Identity,
        config: "",
        references: &[("catgroup_id", "catgroup"), ("catentry_id", "catentry")],
        production_born: "false",
    },
    Table {
        name: "attrval",
        key: "attrval_id",
        rule: Rule::Mapped,
        config: "key = { rule = \"allocate\", sequence = \"public.attrval_seq\" }",
        references: &[("catentry_id", "catentry")],
        production_born: "false",
    },
    Table {
        name: "promotion",
        key: "promotion_id",
        rule: Rule::Mapped,
        config: "key = { rule = \"allocate\", keys_table = \"public.keys\", keys_name = \"promotion\" }",
        references: &[("catentry_id", "catentry")],
        production_born: "false",
    },
    Table {
        name: "attachment",
        key: "attachment_id",
        rule: Rule::Offset(100_000_000),
        config: "key = { rule = \"offset\", offset = 100000000 }",
        references: &[("catentry_id", "catentry")],
        production_born: "false",
    },
];

struct Pair {
    staging: String,
    production: String,
    config: Config,
}

impl Pair {
    fn staging(&self, sql: &str) -> String {
        psql(&clusters().staging, &self.staging, sql)
    }

    fn production(&self, sql: &str) -> String {
        psql(&clusters().production, &self.production, sql)
    }

    fn value(&self, sql: &str) -> String {
        self.production(sql).trim().to_owned()
    }

    /// The key map: table -> staging key -> production key.
    fn key_map(&self) -> HashMap<String, BTreeMap<i64, i64>> {
        let mut map: HashMap<String, BTreeMap<i64, i64>> = HashMap::new();
        for line in self
            .production("SELECT table_name, source_key, target_key FROM stagingprop.key_map")
            .lines()
        {
            let parts: Vec<&str> = line.split('|').collect();
            map.entry(parts[0].trim_start_matches("public.").to_owned())
                .or_default()
                .insert(parts[1].parse().unwrap(), parts[2].parse().unwrap());
        }
        map
    }

    /// Production equals staging through the key map (production-born rows aside), and the key
    /// map has exactly one entry per remapped staging row.
    fn assert_equal_through_key_map(&self) {
        let map = self.key_map();
        let empty = BTreeMap::new();
        let translate = |table: &str, key: i64| -> i64 {
            let rule = TABLES.iter().find(|t| t.name == table).unwrap().rule;
            let mapped = map.get(table).unwrap_or(&empty).get(&key).copied();
            match rule {
                Rule::Identity => key,
                Rule::RemapOnConflict => mapped.unwrap_or(key),
                Rule::Mapped => {
                    mapped.unwrap_or_else(|| panic!("{table} key {key} has no mapping"))
                }
                Rule::Offset(n) => key + n,
            }
        };
        for table in TABLES {
            let rows = |sql: String, on_staging: bool| -> BTreeSet<String> {
                let out = if on_staging {
                    self.staging(&sql)
                } else {
                    self.production(&sql)
                };
                out.lines().map(str::to_owned).collect()
            };
            let staging = rows(format!("SELECT to_jsonb(t) FROM {} t", table.name), true);
            let production = rows(
                format!(
                    "SELECT to_jsonb(t) FROM {} t WHERE ({}) IS NOT TRUE",
                    table.name, table.production_born
                ),
                false,
            );
            let own_key = (table.rule != Rule::Identity).then_some(table.key);
            let translated: BTreeSet<String> = staging
                .iter()
                .map(|line| {
                    let mut row: serde_json::Map<String, Json> =
                        serde_json::from_str(line).unwrap();
                    let mut columns: Vec<(&str, &str)> = table.references.to_vec();
                    if let Some(key) = own_key {
                        columns.push((key, table.name));
                    }
                    for (column, parent) in columns {
                        if let Some(key) = row[column].as_i64() {
                            row.insert(column.into(), Json::from(translate(parent, key)));
                        }
                    }
                    Json::Object(row).to_string()
                })
                .collect();
            let production: BTreeSet<String> = production
                .iter()
                .map(|l| serde_json::from_str::<Json>(l).unwrap().to_string())
                .collect();
            assert!(
                translated == production,
                "{} differs through the key map:\n  staging (translated) only: {:?}\n  production only: {:?}",
                table.name,
                translated.difference(&production).collect::<Vec<_>>(),
                production.difference(&translated).collect::<Vec<_>>()
            );
            // One mapping per remapped row, none left over.
            let entries = map.get(table.name).unwrap_or(&empty);
            let keys = || -> BTreeSet<i64> {
                self.staging(&format!("SELECT {} FROM {}", table.key, table.name))
                    .lines()
                    .map(|l| l.parse().unwrap())
                    .collect()
            };
            match table.rule {
                Rule::Identity | Rule::Offset(_) => assert!(
                    entries.is_empty(),
                    "{} keeps no mappings: {entries:?}",
                    table.name
                ),
                Rule::Mapped => assert_eq!(
                    entries.keys().copied().collect::<BTreeSet<_>>(),
                    keys(),
                    "{}: one mapping per staging row",
                    table.name
                ),
                Rule::RemapOnConflict => {
                    let keys = keys();
                    for (source, target) in entries {
                        assert!(
                            keys.contains(source),
                            "{}: mapping of staging key {source} outlived its row",
                            table.name
                        );
                        assert_ne!(
                            source, target,
                            "{}: a kept key needs no mapping",
                            table.name
                        );
                    }
                }
            }
        }
    }
}

fn pair(prefix: &str) -> Pair {
    let c = clusters();
    let staging = fresh_db(&c.staging, prefix);
    let production = fresh_db(&c.production, prefix);
    psql(&c.staging, &staging, SCHEMA);
    psql(&c.production, &production, SCHEMA);
    let mut text = format!(
        "[staging]\nurl = \"{}\"\nsslmode = \"disable\"\n[production]\nurl = \"{}\"\nsslmode = \"disable\"\n\
         [sync]\nslot = \"{prefix}\"\npublication = \"{prefix}\"\nheartbeat_interval_secs = 1\n",
        c.staging.conninfo(&staging, "postgres"),
        c.production.conninfo(&production, "postgres"),
    );
    for table in TABLES {
        text.push_str(&format!(
            "[[tables]]\nname = \"public.{}\"\n{}\n",
            table.name, table.config
        ));
    }
    text.push_str(
        "[[references]]\ncolumn = \"public.attrval.catentry_id\"\ntable = \"public.catentry\"\n",
    );
    let config = Config::from_toml_str(&text, "test").unwrap();
    Pair {
        staging,
        production,
        config,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_in_sync_with_children_following() {
    let p = pair("remap_sync");
    // Production's own rows, under keys staging is about to use.
    p.production(
        "INSERT INTO catentry VALUES (1, 'PROD-1', 'prod one'), (2, 'PROD-2', 'prod two'), (5, 'PROD-5', 'prod five');
         INSERT INTO catentdesc VALUES (1, -1, 'prod desc 1');
         INSERT INTO offer VALUES (1, 1, true);
         INSERT INTO offerprice VALUES (1, 'USD', 9.99);
         INSERT INTO catgroup VALUES (500, 'SHOES', NULL, 'Production shoes');
         INSERT INTO keys VALUES ('offer', 0, 2000000, 2999999), ('promotion', 0, 3000000, 3000002);",
    );
    init(&p.config, &InitOptions::default())
        .await
        .expect("init");
    p.staging(
        "BEGIN;
         INSERT INTO catentry VALUES (1, 'ST-1', 'staging one'), (2, 'ST-2', 'staging two'),
           (3, 'ST-3', 'staging three'), (4, 'ST-4', 'staging four'), (5, 'ST-5', 'staging five');
         INSERT INTO catentdesc VALUES (1, -1, 'desc 1'), (1, -2, 'desc 1b'), (2, -1, 'desc 2'), (3, -1, 'desc 3');
         INSERT INTO offer VALUES (1, 1, true), (2, 2, false), (3, 3, true);
         INSERT INTO offerprice VALUES (1, 'USD', 1), (1, 'EUR', 2), (2, 'USD', 3), (3, 'USD', 4);
         INSERT INTO catgroup VALUES (1, 'SHOES', NULL, 'Shoes'), (2, 'HATS', 1, 'Hats');
         INSERT INTO catgpenrel VALUES (1, 1, 1), (2, 3, 2);
         INSERT INTO attrval VALUES (1, 1, 'red'), (2, 3, 'blue');
         INSERT INTO promotion VALUES (1, 2, 'promo');
         INSERT INTO attachment VALUES (1, 'a.png', 1), (2, 'b.png', 3);
         COMMIT;",
    );
    caught_up(&p.config).await.expect("first sync");
    p.assert_equal_through_key_map();
    // verify compares through the key map and leaves production's colliding rows out.
    assert_verify_matches(&p.config).await;
    let map = p.key_map();
    // Colliding keys moved to production's sequence / KEYS range, free ones kept.
    let catentry = &map["catentry"];
    assert_eq!(catentry.keys().copied().collect::<Vec<_>>(), vec![1, 2, 5]);
    assert!(
        catentry
            .values()
            .all(|&k| (1_000_000..1_000_010).contains(&k))
    );
    assert_eq!(map["offer"].get(&1).copied(), Some(2_000_000));
    // The natural key matched production's SHOES; HATS is new, under production's sequence.
    assert_eq!(map["catgroup"].get(&1).copied(), Some(500));
    assert_eq!(map["catgroup"].get(&2).copied(), Some(7_000_000));
    assert_eq!(
        p.value("SELECT parent_id || ' ' || name FROM catgroup WHERE identifier = 'HATS'"),
        "500 Hats"
    );
    assert_eq!(
        map["attrval"].values().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([5_000_000, 5_000_001])
    );
    assert_eq!(map["promotion"].get(&1).copied(), Some(3_000_000));
    assert_eq!(
        p.value("SELECT counter FROM keys WHERE tablename = 'promotion'"),
        "3000000"
    );
    // Production-born rows are untouched.
    assert_eq!(
        p.value("SELECT string_agg(catentry_id || ' ' || name, ',' ORDER BY 1) FROM catentry WHERE partnumber LIKE 'PROD-%'"),
        "1 prod one,2 prod two,5 prod five"
    );
    assert_eq!(
        p.value("SELECT name FROM catentdesc WHERE catentry_id = 1"),
        "prod desc 1"
    );
    assert_eq!(
        p.value("SELECT price FROM offerprice WHERE offer_id = 1"),
        "9.99000"
    );

    // Updates, deletes with their cascades, key changes (mapped, kept and offset), a staging key
    // equal to a key production allocated, and a natural-key row updated.
    p.staging(
        "UPDATE catentry SET name = 'staging one v2' WHERE catentry_id = 1;
         UPDATE catentdesc SET name = 'desc 1 v2' WHERE catentry_id = 1 AND language_id = -1;
         DELETE FROM catentry WHERE catentry_id = 2;
         UPDATE catentry SET catentry_id = 40 WHERE catentry_id = 4;
         UPDATE catentry SET catentry_id = 50, name = 'five moved' WHERE catentry_id = 5;
         UPDATE attachment SET attachment_id = 3 WHERE attachment_id = 2;
         UPDATE catgroup SET name = 'Shoes v2' WHERE catgroup_id = 1;
         INSERT INTO catentry VALUES (1000000, 'ST-1M', 'staging million');
         INSERT INTO catentdesc VALUES (1000000, -1, 'desc million');
         DELETE FROM offer WHERE offer_id = 1;
         UPDATE attrval SET value = 'dark red' WHERE attrval_id = 1;",
    );
    caught_up(&p.config).await.expect("second sync");
    p.assert_equal_through_key_map();
    let map = p.key_map();
    let catentry = &map["catentry"];
    assert!(!catentry.contains_key(&2), "a deleted row's mapping goes");
    assert!(!catentry.contains_key(&5) && !catentry.contains_key(&4));
    assert_eq!(
        catentry.get(&40).copied(),
        Some(4),
        "a kept row keeps its key"
    );
    assert!(catentry.get(&50).is_some_and(|&k| k >= 1_000_000));
    assert!(
        catentry.get(&1_000_000).is_some_and(|&k| k != 1_000_000),
        "a staging key production already used moves"
    );
    assert!(!map.contains_key("offer") || map["offer"].is_empty());
    assert!(!map.contains_key("promotion") || map["promotion"].is_empty());
    assert_eq!(
        p.value("SELECT name FROM catgroup WHERE catgroup_id = 500"),
        "Shoes v2"
    );
    assert_eq!(
        p.value("SELECT count(*) FROM catentry WHERE partnumber LIKE 'PROD-%'"),
        "3"
    );

    // The KEYS range of promotion has two keys left: three new rows exhaust it.
    p.staging(
        "INSERT INTO promotion VALUES (10, 1, 'a'), (11, 1, 'b'), (12, 3, 'c');
         INSERT INTO catentry VALUES (6, 'ST-6', 'six');",
    );
    let err = caught_up(&p.config)
        .await
        .expect_err("sync stops when the KEYS range runs out");
    let message = err.to_string();
    assert!(
        message.contains("public.keys")
            && message.contains("public.promotion")
            && message.contains("upperbound 3000002"),
        "{message}"
    );
    assert_eq!(
        p.value("SELECT count(*) FROM catentry WHERE catentry_id = 6"),
        "0",
        "nothing of the failed batch applied"
    );
    assert_eq!(
        p.value("SELECT counter FROM keys WHERE tablename = 'promotion'"),
        "3000000"
    );
    p.production("UPDATE keys SET upperbound = 3000099 WHERE tablename = 'promotion'");
    caught_up(&p.config)
        .await
        .expect("sync after raising the bound");
    p.assert_equal_through_key_map();
    assert_eq!(map_len(&p, "promotion"), 3);

    // A reference to a key production has neither mapped nor holds is an error naming it.
    p.staging("INSERT INTO catentry VALUES (60, 'ST-60', 'sixty')");
    caught_up(&p.config).await.expect("sync of catentry 60");
    p.production("DELETE FROM catentry WHERE catentry_id = 60");
    p.staging("INSERT INTO catentdesc VALUES (60, -1, 'orphan')");
    let err = caught_up(&p.config)
        .await
        .expect_err("an unmapped reference stops sync");
    let message = err.to_string();
    assert!(
        message.contains("public.catentdesc.catentry_id refers to public.catentry key 60"),
        "{message}"
    );
    assert_eq!(
        p.value("SELECT count(*) FROM catentdesc WHERE name = 'orphan'"),
        "0"
    );
}

/// verify compares through the key map and finds the two sides equal.
async fn assert_verify_matches(config: &Config) {
    let diffs = verify(config, &VerifyOptions::default())
        .await
        .expect("verify");
    assert!(
        diffs.iter().all(|d| d.matches()),
        "{}",
        render_diffs(&diffs)
    );
}

fn map_len(p: &Pair, table: &str) -> usize {
    p.key_map().get(table).map_or(0, BTreeMap::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remapping_needs_a_single_integer_key_and_existing_columns() {
    let c = clusters();
    let staging = fresh_db(&c.staging, "remap_bad");
    let production = fresh_db(&c.production, "remap_bad");
    let schema = "CREATE TABLE price (offer_id bigint, currency char(3), amount numeric,
                    PRIMARY KEY (offer_id, currency));
                  CREATE TABLE member (member_id bigint PRIMARY KEY, logon text);";
    psql(&c.staging, &staging, schema);
    psql(&c.production, &production, schema);
    let text = format!(
        "[staging]\nurl = \"{}\"\nsslmode = \"disable\"\n[production]\nurl = \"{}\"\nsslmode = \"disable\"\n\
         [sync]\nslot = \"remap_bad\"\npublication = \"remap_bad\"\n\
         [[tables]]\nname = \"public.price\"\nkey = {{ rule = \"offset\", offset = 10 }}\n\
         [[tables]]\nname = \"public.member\"\nkey = {{ rule = \"natural\", columns = [\"login\"], sequence = \"public.member_seq\" }}\n",
        c.staging.conninfo(&staging, "postgres"),
        c.production.conninfo(&production, "postgres"),
    );
    let config = Config::from_toml_str(&text, "test").unwrap();
    init(&config, &InitOptions::default()).await.expect("init");
    let err = caught_up(&config).await.expect_err("bad rules are refused");
    let message = err.to_string();
    assert!(matches!(err, SyncError::Rules(_)), "{message}");
    assert!(
        message.contains(
            "public.price: key rule \"offset\" needs a primary key of one integer column"
        ),
        "{message}"
    );
    assert!(
        message.contains("public.member: natural key column login does not exist on production"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_applies_the_rules_and_sync_continues_through_the_key_map() {
    let p = pair("remap_copy");
    p.production(
        "INSERT INTO keys VALUES ('offer', 0, 2000000, 2999999), ('promotion', 0, 3000000, 3000009);",
    );
    p.staging(
        "INSERT INTO catentry SELECT g, 'ST-' || g, 'entry ' || g FROM generate_series(1, 200) g;
         INSERT INTO catentdesc SELECT g, -1, 'desc ' || g FROM generate_series(1, 200) g;
         INSERT INTO offer SELECT 10 + g, g, g % 2 = 0 FROM generate_series(1, 200) g;
         INSERT INTO offerprice SELECT 10 + g, 'USD', g FROM generate_series(1, 200) g;
         INSERT INTO catgroup VALUES (1, 'SHOES', NULL, 'Shoes'), (2, 'HATS', 1, 'Hats');
         INSERT INTO catgpenrel SELECT 1 + g / 100, g, g FROM generate_series(1, 150) g;
         INSERT INTO attrval SELECT g, g, 'value ' || g FROM generate_series(1, 100) g;
         INSERT INTO promotion SELECT g, g, 'promo ' || g FROM generate_series(1, 20) g;
         INSERT INTO attachment SELECT g, 'file' || g || '.png', g FROM generate_series(1, 30) g;",
    );
    init_without_slot(&p.config).await;

    // promotion needs 20 keys and its KEYS range holds 10: refused before anything is written.
    let err = copy::copy(
        &p.config,
        &CopyOptions::new(Side::Staging, Side::Production),
    )
    .await
    .expect_err("the KEYS range is too small");
    let message = err.to_string();
    assert!(
        message.contains("public.keys") && message.contains("public.promotion"),
        "{message}"
    );
    assert_eq!(p.value("SELECT count(*) FROM catentry"), "0");
    p.production("UPDATE keys SET upperbound = 3000999 WHERE tablename = 'promotion'");

    let report = copy::copy(
        &p.config,
        &CopyOptions::new(Side::Staging, Side::Production),
    )
    .await
    .expect("copy");
    assert!(report.handoff.is_some());
    p.assert_equal_through_key_map();
    let map = p.key_map();
    assert_eq!(
        map_len(&p, "catentry"),
        0,
        "nothing collides in an empty table"
    );
    assert_eq!(map["promotion"].len(), 20);
    assert!(map["promotion"].values().all(|&k| k >= 3_000_000));
    assert_eq!(map["attrval"].len(), 100);
    let shoes = map["catgroup"][&1];
    assert_eq!(
        p.value("SELECT parent_id FROM catgroup WHERE identifier = 'HATS'"),
        shoes.to_string()
    );
    assert_eq!(
        p.value("SELECT min(attachment_id) || '-' || max(attachment_id) FROM attachment"),
        "100000001-100000030"
    );

    // Sync continues where the copy's snapshot ended, through the mappings copy recorded.
    p.staging(
        "UPDATE promotion SET name = 'changed' WHERE promotion_id <= 5;
         DELETE FROM promotion WHERE promotion_id = 20;
         INSERT INTO promotion VALUES (21, 3, 'new');
         UPDATE attrval SET value = 'changed' WHERE attrval_id % 10 = 0;
         DELETE FROM catentry WHERE catentry_id = 7;
         UPDATE catgroup SET name = 'Hats v2' WHERE catgroup_id = 2;
         INSERT INTO catentdesc VALUES (3, -2, 'second language');
         UPDATE attachment SET path = 'moved.png' WHERE attachment_id = 3;",
    );
    caught_up(&p.config).await.expect("sync after copy");
    p.assert_equal_through_key_map();
    assert_verify_matches(&p.config).await;

    // A row changed, deleted and added on each side, found through the remapped keys and
    // reported under staging's keys.
    let promotion_1 = p.key_map()["promotion"][&1];
    p.production(&format!(
        "UPDATE promotion SET name = 'tampered' WHERE promotion_id = {promotion_1};
         DELETE FROM catentdesc WHERE catentry_id = 5 AND language_id = -1;
         INSERT INTO offer VALUES (5555, 3, true);"
    ));
    p.staging(
        "UPDATE attrval SET value = 'changed on staging' WHERE attrval_id = 2;
         DELETE FROM offerprice WHERE offer_id = 20;
         INSERT INTO catgroup VALUES (3, 'BAGS', NULL, 'Bags');",
    );
    let diffs = verify(&p.config, &VerifyOptions::default())
        .await
        .expect("verify");
    let found = |table: &str| {
        diffs
            .iter()
            .find(|d| d.table == format!("public.{table}"))
            .unwrap_or_else(|| panic!("no report for {table}"))
    };
    let report = render_diffs(&diffs);
    assert_eq!(
        found("promotion").different_keys,
        vec!["promotion_id=1"],
        "{report}"
    );
    assert_eq!(
        found("catentdesc").missing_keys,
        vec!["catentry_id=5,language_id=-1"],
        "{report}"
    );
    assert_eq!(found("offer").extra_keys, vec!["offer_id=5555"], "{report}");
    assert_eq!(
        found("attrval").different_keys,
        vec!["attrval_id=2"],
        "{report}"
    );
    assert_eq!(
        found("offerprice").extra_keys,
        vec!["offer_id=20,currency=USD"],
        "{report}"
    );
    assert_eq!(
        found("catgroup").missing_keys,
        vec!["catgroup_id=3"],
        "{report}"
    );
    let differing = diffs.iter().filter(|d| !d.matches()).count();
    assert_eq!(differing, 6, "{report}");

    // Back the other way: a new staging gets production's keys, offsets undone, and
    // production's key map says every key now maps to itself.
    let c = clusters();
    let fresh = fresh_db(&c.staging, "remap_copy_back");
    psql(&c.staging, &fresh, SCHEMA);
    let mut back = p.config.clone();
    back.staging.url = back
        .staging
        .url
        .replace(&format!("dbname={}", p.staging), &format!("dbname={fresh}"));
    assert!(back.staging.url.contains(&fresh), "{}", back.staging.url);
    copy::copy(&back, &CopyOptions::new(Side::Production, Side::Staging))
        .await
        .expect("copy back");
    assert_eq!(
        psql(
            &c.staging,
            &fresh,
            "SELECT min(attachment_id) || '-' || max(attachment_id) FROM attachment"
        )
        .trim(),
        "1-30"
    );
    let map = p.key_map();
    assert!(map.get("catentry").is_none_or(BTreeMap::is_empty));
    // 20 copied, one deleted, one added, one gone with catentry 7.
    assert_eq!(map["promotion"].len(), 19);
    assert!(map["promotion"].iter().all(|(s, t)| s == t));
    assert_eq!(
        psql(&c.staging, &fresh, "SELECT count(*) FROM promotion").trim(),
        "19"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_mapped_shows_production_keys() {
    let p = pair("remap_tail");
    p.production("INSERT INTO catentry VALUES (1, 'PROD-1', 'prod one');");
    init(&p.config, &InitOptions::default())
        .await
        .expect("init");
    p.staging("INSERT INTO catentry VALUES (1, 'ST-1', 'one'), (3, 'ST-3', 'three');");
    caught_up(&p.config).await.expect("sync");
    let moved = p.key_map()["catentry"][&1];
    let st = status(&p.config, &Thresholds::default())
        .await
        .expect("status");
    assert_eq!(st.key_map.len(), 1, "{st:?}");
    assert_eq!(
        (st.key_map[0].table.as_str(), st.key_map[0].entries),
        ("public.catentry", 1)
    );
    assert!(render(&st).contains("key map entries: public.catentry 1"));
    // With a spool configured, status says what it holds (empty here: sync does not write it yet).
    let spool_dir =
        std::env::temp_dir().join(format!("stagingprop-status-spool-{}", std::process::id()));
    let mut with_spool = p.config.clone();
    with_spool.spool = Some(stagingprop::config::SpoolConfig {
        dir: spool_dir.clone(),
        max_bytes: 1 << 30,
        retain_secs: 60,
        segment_bytes: 1 << 20,
    });
    let st = status(&with_spool, &Thresholds::default())
        .await
        .expect("status");
    let spool = st.spool.as_ref().expect("spool status");
    assert_eq!((spool.held.segments, spool.held.newest_end), (0, None));
    assert!(render(&st).contains("empty"), "{}", render(&st));
    // A spooled transaction 1000 bytes past production's progress.
    let applied: Lsn = st.last_applied.as_ref().unwrap().end_lsn.parse().unwrap();
    let (mut writer, _) = SpoolWriter::open(&spool_dir, 1 << 20).unwrap();
    let commit = Lsn(applied.0 + 992);
    for message in [
        LogicalMessage::Begin {
            final_lsn: commit,
            commit_time: PgTimestamp(0),
            xid: 1,
        },
        LogicalMessage::Commit {
            flags: 0,
            commit_lsn: commit,
            end_lsn: Lsn(commit.0 + 8),
            commit_time: PgTimestamp(0),
        },
    ] {
        writer.append(commit, &message).unwrap();
    }
    writer.flush().unwrap();
    let st = status(&with_spool, &Thresholds::default())
        .await
        .expect("status");
    let spool = st.spool.as_ref().expect("spool status");
    assert_eq!(spool.held.segments, 1);
    assert_eq!(spool.production_behind_bytes, Some(1000));
    assert!(
        render(&st).contains("production is 1000 bytes behind it"),
        "{}",
        render(&st)
    );
    let _ = std::fs::remove_dir_all(&spool_dir);

    let staging = support::endpoint(&clusters().staging, &p.staging, "postgres");
    let options = TailOptions {
        publication: p.config.sync.publication.clone(),
        limit: Some(4),
        idle_exit: Some(std::time::Duration::from_secs(30)),
        mapped: Some(p.config.clone()),
        ..TailOptions::default()
    };
    let tailing = tokio::spawn(async move {
        let mut out = Vec::new();
        tail(&staging, &options, &mut out, std::future::pending())
            .await
            .map(|_| String::from_utf8(out).unwrap())
    });
    // tail reads from the moment its temporary slot exists.
    wait_for_tail_slot(&clusters().staging, &p.staging).await;
    p.staging(
        "UPDATE catentry SET name = 'x' WHERE catentry_id = 1;
         UPDATE catentry SET name = 'y' WHERE catentry_id = 3;
         INSERT INTO catentdesc VALUES (1, -5, 'five');
         INSERT INTO attrval VALUES (9, 1, 'v');",
    );
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), tailing)
        .await
        .expect("tail finished")
        .unwrap()
        .expect("tail ran");
    let lines: Vec<Json> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{out}");
    let keys = |i: usize| (lines[i]["key"].clone(), lines[i]["mapped_key"].clone());
    assert_eq!(
        keys(0),
        (
            serde_json::json!({"catentry_id": "1"}),
            serde_json::json!({"catentry_id": moved.to_string()})
        )
    );
    assert_eq!(keys(1).1, serde_json::json!({"catentry_id": "3"}));
    assert_eq!(
        keys(2).1,
        serde_json::json!({"catentry_id": moved.to_string(), "language_id": "-5"})
    );
    // An allocated key exists only once sync applied the row.
    assert_eq!(keys(3).1, serde_json::json!({"attrval_id": null}));
}
