//! The documentation cannot drift from the code: every configuration key the parser accepts is
//! in the configuration reference and in `stagingprop.example.toml` (and nothing else is), every
//! metric the code records is in the monitoring page (and no other), every exit code is on the
//! exit-codes page, every command and option of `--help` is on the commands page, and every
//! link between the documents leads to a file that exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_stagingprop");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The fields of every `struct RawX { ... }` of the config parser, by struct name.
fn parser_keys() -> BTreeMap<String, BTreeSet<String>> {
    let source = read("src/config/validate.rs");
    let mut structs = BTreeMap::new();
    let mut current: Option<(String, BTreeSet<String>)> = None;
    for line in source.lines() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed
            .strip_prefix("pub(super) struct Raw")
            .or_else(|| trimmed.strip_prefix("struct Raw"))
            && let Some(name) = rest.strip_suffix(" {")
        {
            current = Some((name.to_owned(), BTreeSet::new()));
            continue;
        }
        if let Some((name, fields)) = &mut current {
            if trimmed == "}" {
                structs.insert(name.clone(), std::mem::take(fields));
                current = None;
            } else if !trimmed.starts_with("//")
                && !trimmed.starts_with('#')
                && let Some((field, _)) = trimmed.split_once(':')
            {
                fields.insert(field.trim().to_owned());
            }
        }
    }
    structs
}

/// Where each parser struct's keys live: its heading on the configuration page, and its section
/// in the example file.
fn placement(raw: &str) -> (&'static str, &'static str) {
    match raw {
        "Config" => ("", ""),
        "Db" => ("## `[staging]` and `[production]`", "[staging]"),
        "Sync" => ("## `[sync]`", "[sync]"),
        "Stream" => ("## `[stream]`", "[stream]"),
        "Spool" => ("## `[spool]`", "[spool]"),
        "Table" => ("## `[[tables]]`", "[[tables]]"),
        "Key" => ("### `key = { ... }`", "[[tables]]"),
        "Files" => ("### `files = { ... }`", "[[tables]]"),
        "Reference" => ("## `[[references]]`", "[[references]]"),
        "TablePattern" => ("## `[[table_patterns]]`", "[[table_patterns]]"),
        "Scope" => ("## `[scopes.NAME]`", "[scopes"),
        "Ddl" => ("## `[ddl]`", "[ddl]"),
        "Guard" => ("## `[guard]`", "[guard]"),
        other => panic!(
            "the config parser has a new struct Raw{other}: say in tests/docs.rs where its keys \
             are documented"
        ),
    }
}

/// Keys accepted only to be refused with a message of their own: documented, not in the example.
const REFUSED: &[&str] = &["password", "token"];

/// The backticked first column of every table row under each `##`/`###` heading.
fn reference_keys(page: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut heading = String::new();
    for line in page.lines() {
        if line.starts_with("## ") || line.starts_with("### ") {
            heading = line.to_owned();
        } else if let Some(rest) = line.strip_prefix("| `")
            && let Some((key, _)) = rest.split_once('`')
        {
            out.entry(heading.clone())
                .or_default()
                .insert(key.to_owned());
        }
    }
    out
}

/// Keys written (or commented out as `# key = ...`) in the example file, by the section header
/// they stand under (`[scopes.x.filters]` counts as `[scopes`); inline tables' keys count for
/// the section they are written in.
fn example_keys(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines() {
        // A separator line starts the explanation of what follows: no section's keys.
        if line.starts_with("# ---") {
            section.clear();
            continue;
        }
        let line = line.trim_start_matches('#').trim();
        if line.starts_with('[') && !line.contains('=') {
            section = if line.starts_with("[scopes") {
                "[scopes".to_owned()
            } else {
                line.split_whitespace().next().unwrap_or("").to_owned()
            };
            if line.starts_with("[scopes.") && line.contains(".filters]") {
                out.entry(section.clone())
                    .or_default()
                    .insert("filters".into());
            }
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            continue;
        }
        let keys = out.entry(section.clone()).or_default();
        keys.insert(key.to_owned());
        // `key = { rule = ..., sequence = ... }`: the inline table's keys too.
        if let Some(inner) = value.trim().strip_prefix('{') {
            for part in inner.trim_end_matches('}').split(',') {
                if let Some((k, _)) = part.split_once('=') {
                    keys.insert(k.trim().to_owned());
                }
            }
        }
    }
    out
}

#[test]
fn every_configuration_key_is_documented_and_in_the_example() {
    let parser = parser_keys();
    assert!(parser.len() >= 10, "found only {parser:?} in the parser");
    let reference = reference_keys(&read("docs/configuration.md"));
    let example = example_keys(&read("stagingprop.example.toml"));
    let mut problems = Vec::new();
    let mut documented_headings = BTreeSet::new();
    for (raw, keys) in &parser {
        let (heading, section) = placement(raw);
        if heading.is_empty() {
            continue;
        }
        documented_headings.insert(heading);
        let documented = reference.get(heading).cloned().unwrap_or_default();
        for key in keys.difference(&documented) {
            problems.push(format!(
                "docs/configuration.md: {heading} lacks `{key}` (the parser takes it)"
            ));
        }
        for key in documented.difference(keys) {
            problems.push(format!(
                "docs/configuration.md: {heading} lists `{key}`, which the parser refuses"
            ));
        }
        let written = example.get(section).cloned().unwrap_or_default();
        for key in keys {
            if !written.contains(key) && !REFUSED.contains(&key.as_str()) {
                problems.push(format!(
                    "stagingprop.example.toml: {section} lacks `{key}` (write it, commented out if need be)"
                ));
            }
        }
        for key in &written {
            let known = parser
                .iter()
                .filter(|(r, _)| placement(r).1 == section)
                .any(|(_, k)| k.contains(key));
            if !known {
                problems.push(format!(
                    "stagingprop.example.toml: {section} has `{key}`, which the parser refuses"
                ));
            }
        }
    }
    for heading in reference.keys() {
        if !documented_headings.contains(heading.as_str()) && heading.contains('`') {
            problems.push(format!(
                "docs/configuration.md: {heading} documents keys of no parser struct"
            ));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// Every `"stagingprop_..."` name the code passes to a metrics macro.
fn recorded_metrics() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for macro_call in ["counter!(", "gauge!(", "histogram!("] {
                    for (i, _) in text.match_indices(macro_call) {
                        let rest = text[i + macro_call.len()..].trim_start();
                        if let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next())
                        {
                            out.insert(name.to_owned());
                        }
                    }
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&root().join("src"), &mut out);
    out
}

#[test]
fn every_metric_is_documented() {
    let recorded = recorded_metrics();
    assert!(recorded.len() >= 15, "found only {recorded:?}");
    let page = read("docs/monitoring.md");
    let documented: BTreeSet<String> = page
        .lines()
        .filter_map(|l| l.strip_prefix("| `stagingprop_"))
        .filter_map(|r| r.split_once('`'))
        .map(|(name, _)| format!("stagingprop_{name}"))
        .collect();
    let missing: Vec<_> = recorded.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&recorded).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/monitoring.md lacks {missing:?} and documents {stale:?}, which no code records"
    );
}

#[test]
fn every_exit_code_is_documented() {
    let main = read("src/main.rs");
    let codes: BTreeSet<u8> = main
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| l.split_once(": u8 = "))
        .filter_map(|(_, v)| v.trim_end_matches(';').parse().ok())
        .chain([0])
        .collect();
    assert!(codes.len() >= 10, "found only {codes:?}");
    let page = read("docs/exit-codes.md");
    let documented: BTreeSet<u8> = page
        .lines()
        .filter_map(|l| l.strip_prefix("| "))
        .filter_map(|l| l.split(' ').next())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(
        codes, documented,
        "exit codes in src/main.rs and docs/exit-codes.md"
    );
}

/// The subcommands and long options a `--help` text lists.
fn help_of(args: &[&str]) -> (Vec<String>, BTreeSet<String>) {
    let out = Command::new(BIN).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{args:?} --help failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut commands = Vec::new();
    let mut in_commands = false;
    let mut options = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if in_commands {
            match line
                .strip_prefix("  ")
                .and_then(|l| l.split_whitespace().next())
            {
                Some(name) if !line.starts_with("   ") && name != "help" => {
                    commands.push(name.to_owned())
                }
                Some(_) => {}
                None => in_commands = false,
            }
        }
        for word in line.split(|c: char| c.is_whitespace() || c == ',') {
            if let Some(flag) = word.strip_prefix("--")
                && let Some(flag) = flag.split(['=', '[', '<']).next()
                && !flag.is_empty()
                && flag.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                && !matches!(flag, "help" | "version")
            {
                options.insert(format!("--{flag}"));
            }
        }
    }
    (commands, options)
}

#[test]
fn every_command_and_option_is_on_the_commands_page() {
    let page = read("docs/commands.md");
    let mut problems = Vec::new();
    let (commands, global) = help_of(&[]);
    assert!(commands.len() >= 9, "{commands:?}");
    let mut queue: Vec<(Vec<String>, BTreeSet<String>)> = vec![(Vec::new(), global)];
    for command in commands {
        let (sub, options) = help_of(&[command.as_str()]);
        queue.push((vec![command.clone()], options));
        for s in sub {
            let (_, options) = help_of(&[command.as_str(), s.as_str()]);
            queue.push((vec![command.clone(), s], options));
        }
    }
    for (path, options) in queue {
        if let Some(name) = path.last()
            && !page.contains(&format!("`{name}`"))
            && !page.contains(&format!("{} {name}", path[0]))
        {
            problems.push(format!("`{}` is not described", path.join(" ")));
        }
        for option in options {
            if !page.contains(&option) {
                problems.push(format!("`{} {option}` is not described", path.join(" ")));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/commands.md:\n{}",
        problems.join("\n")
    );
}

#[test]
fn links_between_the_documents_lead_somewhere() {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.extend(["README.md", "CONTRIBUTING.md"].map(|p| root().join(p)));
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for (i, _) in text.match_indices("](") {
            let target = text[i + 2..].split(')').next().unwrap_or("");
            if target.contains("://") || target.starts_with('#') || target.is_empty() {
                continue;
            }
            let file = target.split('#').next().unwrap_or("");
            let resolved = page.parent().unwrap().join(file);
            if !resolved.exists() {
                broken.push(format!("{}: {target}", page.display()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links to nothing:\n{}",
        broken.join("\n")
    );
    // The book's table of contents names every page of the manual.
    let summary = read("docs/SUMMARY.md");
    for page in pages
        .iter()
        .filter(|p| p.parent() == Some(&root().join("docs")))
    {
        let name = page.file_name().unwrap().to_string_lossy();
        assert!(
            name == "SUMMARY.md" || summary.contains(&format!("({name})")),
            "docs/SUMMARY.md does not list {name}"
        );
    }
}
