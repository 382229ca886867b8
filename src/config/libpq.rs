//! libpq's files, read as libpq reads them: the connection service file (`service=NAME`) and
//! the password file (`~/.pgpass`). Parsing and matching are plain functions over text; the
//! functions that read the files say which file they used.

use std::path::{Path, PathBuf};

/// The user's home directory.
fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

/// The service files to look in, in order: `PGSERVICEFILE` alone when set, else the user's
/// `~/.pg_service.conf`, then the system-wide `pg_service.conf` in `PGSYSCONFDIR` (Debian's
/// libpq: `/etc/postgresql-common`).
pub fn service_files() -> Vec<PathBuf> {
    if let Some(file) = std::env::var_os("PGSERVICEFILE") {
        return vec![PathBuf::from(file)];
    }
    let mut files: Vec<PathBuf> = home()
        .map(|h| h.join(".pg_service.conf"))
        .into_iter()
        .collect();
    let sysconf = std::env::var_os("PGSYSCONFDIR")
        .map_or_else(|| PathBuf::from("/etc/postgresql-common"), PathBuf::from);
    files.push(sysconf.join("pg_service.conf"));
    files
}

/// The settings of service `name` in a service file's text, as `key=value` pairs; `None` when
/// the file has no such section. Lines are `[name]` headers, `key=value` settings, `#`
/// comments and blanks.
pub fn parse_service(text: &str, name: &str) -> Result<Option<Vec<(String, String)>>, String> {
    let mut in_section = false;
    let mut found = false;
    let mut settings = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            let header = header
                .strip_suffix(']')
                .ok_or_else(|| format!("line {}: a section header lacks its ']'", i + 1))?;
            in_section = header.trim() == name;
            found |= in_section;
            continue;
        }
        if !in_section {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected key=value", i + 1))?;
        settings.push((key.trim().to_owned(), value.trim().to_owned()));
    }
    Ok(found.then_some(settings))
}

/// Service `name`'s settings as a libpq key=value string, and the file they came from.
pub fn service(name: &str) -> Result<(PathBuf, String), String> {
    let files = service_files();
    for file in &files {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(format!(
                    "cannot read the service file {}: {e}",
                    file.display()
                ));
            }
        };
        let settings = parse_service(&text, name)
            .map_err(|m| format!("the service file {}: {m}", file.display()))?;
        if let Some(settings) = settings {
            let text = settings
                .iter()
                .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
                .collect::<Vec<_>>()
                .join(" ");
            return Ok((file.clone(), text));
        }
    }
    let looked: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    Err(format!(
        "names service {name:?}, which no service file defines (looked in {}); add a [{name}] \
         section, or set PGSERVICEFILE",
        looked.join(", ")
    ))
}

/// The password file to read: the connection's `passfile`, else `PGPASSFILE`, else
/// `~/.pgpass`.
pub fn pgpass_file(passfile: Option<&Path>) -> Option<PathBuf> {
    passfile
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("PGPASSFILE").map(PathBuf::from))
        .or_else(|| home().map(|h| h.join(".pgpass")))
}

/// What a password file entry is matched against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PasswordFor<'a> {
    /// The host name as given, or `localhost` for the default Unix socket directory.
    pub host: &'a str,
    pub port: u16,
    pub dbname: &'a str,
    pub user: &'a str,
}

/// A password file line's fields: `:` separates them, `\` escapes `:` and `\`.
fn fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    out.last_mut().unwrap().push(next);
                }
            }
            ':' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out
}

/// The password of the first line matching `want` (`*` matches anything), as libpq takes it.
pub fn find_password(text: &str, want: &PasswordFor<'_>) -> Option<String> {
    let port = want.port.to_string();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let f = fields(line);
        if f.len() < 5 {
            continue;
        }
        let matches = |field: &str, value: &str| field == "*" || field == value;
        if matches(&f[0], want.host)
            && matches(&f[1], &port)
            && matches(&f[2], want.dbname)
            && matches(&f[3], want.user)
        {
            // A password containing ':' was escaped; any further fields are part of it.
            return Some(f[4..].join(":"));
        }
    }
    None
}

/// Why a password file is not used.
#[derive(Debug, PartialEq, Eq)]
pub enum PgpassSkipped {
    /// Missing: nothing to say.
    Missing,
    /// Readable by others: libpq ignores such a file, and so does stagingprop.
    Exposed {
        path: PathBuf,
        mode: u32,
    },
    NotAFile {
        path: PathBuf,
    },
    Unreadable {
        path: PathBuf,
        problem: String,
    },
}

/// The password for `want` from `path`, refusing (like libpq) a file that is not a plain file
/// or that its group or others may read or write.
pub fn read_pgpass(path: &Path, want: &PasswordFor<'_>) -> Result<Option<String>, PgpassSkipped> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(PgpassSkipped::Missing),
        Err(e) => {
            return Err(PgpassSkipped::Unreadable {
                path: path.to_owned(),
                problem: e.to_string(),
            });
        }
    };
    if !meta.is_file() {
        return Err(PgpassSkipped::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PgpassSkipped::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| PgpassSkipped::Unreadable {
        path: path.to_owned(),
        problem: e.to_string(),
    })?;
    Ok(find_password(&text, want))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want<'a>(host: &'a str, port: u16, dbname: &'a str, user: &'a str) -> PasswordFor<'a> {
        PasswordFor {
            host,
            port,
            dbname,
            user,
        }
    }

    #[test]
    fn the_first_matching_line_wins_and_stars_match_anything() {
        let text = "# staging\n\
                    db1.example:5432:shop:sp:first\n\
                    *:5433:*:sp:pass\\:with\\\\colon\n\
                    *:*:*:*:fallback\n\
                    short:line\n";
        assert_eq!(
            find_password(text, &want("db1.example", 5432, "shop", "sp")).as_deref(),
            Some("first")
        );
        assert_eq!(
            find_password(text, &want("other", 5433, "x", "sp")).as_deref(),
            Some("pass:with\\colon")
        );
        assert_eq!(
            find_password(text, &want("db1.example", 5432, "shop", "other")).as_deref(),
            Some("fallback")
        );
        assert_eq!(find_password("h:1:d:u:p\n", &want("h", 2, "d", "u")), None);
    }

    #[test]
    fn a_service_section_gives_its_settings() {
        let text =
            "# services\n[staging]\nhost=10.0.0.1\nport = 5433\n\n[production]\nhost=10.0.0.2\n";
        assert_eq!(
            parse_service(text, "staging").unwrap().unwrap(),
            vec![
                ("host".to_owned(), "10.0.0.1".to_owned()),
                ("port".to_owned(), "5433".to_owned())
            ]
        );
        assert_eq!(parse_service(text, "missing").unwrap(), None);
        assert!(parse_service("[broken\nhost=x", "broken").is_err());
        assert!(parse_service("[s]\nno equals", "s").is_err());
    }

    #[test]
    fn an_exposed_password_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sp-pgpass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pgpass");
        std::fs::write(&path, "*:*:*:*:secret\n").unwrap();
        let w = want("h", 5432, "d", "u");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_pgpass(&path, &w).unwrap().as_deref(), Some("secret"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            read_pgpass(&path, &w),
            Err(PgpassSkipped::Exposed {
                path: path.clone(),
                mode: 0o644
            })
        );
        assert_eq!(
            read_pgpass(&dir.join("none"), &w),
            Err(PgpassSkipped::Missing)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
