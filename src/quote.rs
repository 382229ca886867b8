//! SQL text: the one place identifiers and literals are quoted. Names from the config or from the
//! server are never formatted into SQL any other way.

use std::fmt::Write;

/// Quotes an identifier as PostgreSQL does: always double-quoted, embedded quotes doubled.
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for ch in name.chars() {
        if ch == '"' {
            out.push('"');
        }
        out.push(ch);
    }
    out.push('"');
    out
}

/// `"schema"."name"`.
pub fn qualified(schema: &str, name: &str) -> String {
    let mut out = quote_ident(schema);
    out.push('.');
    out.push_str(&quote_ident(name));
    out
}

/// Quotes a string literal. Uses the E'' form when backslashes are present so the result means
/// the same whatever `standard_conforming_strings` says.
pub fn quote_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 3);
    if value.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for ch in value.chars() {
        match ch {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            _ => out.push(ch),
        }
    }
    out.push('\'');
    out
}

/// A comma-separated list of quoted identifiers, e.g. for `publication_names`.
pub fn ident_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for (i, name) in names.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{}", quote_ident(name));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("catentry"), "\"catentry\"");
        assert_eq!(quote_ident("We\"ird"), "\"We\"\"ird\"");
        assert_eq!(qualified("public", "Cat Entry"), "\"public\".\"Cat Entry\"");
    }

    #[test]
    fn quotes_literals() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
        assert_eq!(ident_list(["a", "b\"c"]), "\"a\",\"b\"\"c\"");
    }
}
