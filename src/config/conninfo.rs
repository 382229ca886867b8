//! Connection strings: libpq `key=value` strings and `postgres://` URLs, with the settings
//! stagingprop handles itself (passwords refused, TLS files, `service`) lifted out before
//! tokio-postgres parses the rest.

/// A connection string with the settings stagingprop handles itself taken out.
#[derive(Debug, Default)]
pub(crate) struct ConnectionParts {
    /// What tokio-postgres parses (it knows neither `verify-*` nor `sslrootcert`).
    pub(crate) rest: String,
    pub(crate) sslmode: Option<String>,
    pub(crate) sslrootcert: Option<String>,
    /// Whether a password was seen (its value is dropped on the spot).
    pub(crate) has_password: bool,
}

/// Lifts `sslmode` and `sslrootcert` out of a libpq key=value string or postgres:// URL and
/// notes whether it carries a password. Errors never quote values.
pub(crate) fn split_connection_string(url: &str) -> Result<ConnectionParts, String> {
    let trimmed = url.trim();
    let after_scheme = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|scheme| trimmed.strip_prefix(scheme));
    match after_scheme {
        Some(after_scheme) => split_url(trimmed, after_scheme),
        None => split_key_value(trimmed),
    }
}

fn split_url(url: &str, after_scheme: &str) -> Result<ConnectionParts, String> {
    let mut parts = ConnectionParts::default();
    // tokio-postgres takes everything before the first '@' as user[:password].
    if let Some(at) = after_scheme.find('@') {
        parts.has_password = after_scheme[..at].contains(':');
    }
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut kept = Vec::new();
    for param in query.into_iter().flat_map(|q| q.split('&')) {
        let Some((key, value)) = param.split_once('=') else {
            kept.push(param);
            continue;
        };
        match percent_decode(key)?.as_str() {
            "password" => parts.has_password = true,
            "sslmode" => parts.sslmode = Some(percent_decode(value)?),
            "sslrootcert" => parts.sslrootcert = Some(percent_decode(value)?),
            _ => kept.push(param),
        }
    }
    parts.rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(parts)
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("has a '%' not followed by two hexadecimal digits in its parameters")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "has parameters that do not decode to UTF-8".to_owned())
}

/// libpq key=value syntax: `key = value` pairs separated by whitespace, values optionally in
/// single quotes, backslash escaping the next character.
fn split_key_value(text: &str) -> Result<ConnectionParts, String> {
    let mut parts = ConnectionParts::default();
    let mut kept: Vec<(String, String)> = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!(
                "is neither a postgres:// URL nor libpq key=value pairs: expected '=' after {key:?}"
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => return Err(format!("has an unterminated quoted value for {key:?}")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return Err(format!("has no value for {key:?}"));
            }
        }
        match key.as_str() {
            "password" => parts.has_password = true,
            "sslmode" => parts.sslmode = Some(value),
            "sslrootcert" => parts.sslrootcert = Some(value),
            _ => kept.push((key, value)),
        }
    }
    let quoted: Vec<String> = kept
        .iter()
        .map(|(key, value)| {
            let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
            format!("{key}='{escaped}'")
        })
        .collect();
    parts.rest = quoted.join(" ");
    Ok(parts)
}
