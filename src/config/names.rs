//! Names in the config file: tables and columns as the catalogs spell them, and the names
//! stagingprop creates (slots, publications, channels), which are held to a no-quoting rule.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use super::MAX_IDENTIFIER_BYTES;

/// A schema-qualified table (or sequence) name, as the catalogs spell it: written `schema.table`
/// in the file, unqualified meaning `public`, unquoted parts folded to lower case and
/// double-quoted parts kept as written, as SQL does. Displayed the way it is written, each part
/// double-quoted only where it needs to be (`public.catentry`, `"My Schema"."a.b"`), so the
/// displayed form parses back to the same name wherever stagingprop stores one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_part(f, &self.schema)?;
        f.write_str(".")?;
        write_part(f, &self.name)
    }
}

/// Whether `part` reads back as itself unquoted: what [`parse_qualified_name`] neither folds nor
/// refuses.
fn is_plain(part: &str) -> bool {
    let mut chars = part.chars();
    chars
        .next()
        .is_some_and(|c| (c.is_alphabetic() || c == '_') && !c.is_ascii_uppercase())
        && chars.all(|c| (c.is_alphanumeric() || c == '_' || c == '$') && !c.is_ascii_uppercase())
}

/// One part of a dotted name, double-quoted where it must be.
fn write_part(f: &mut fmt::Formatter<'_>, part: &str) -> fmt::Result {
    if is_plain(part) {
        f.write_str(part)
    } else {
        f.write_str(&crate::quote::quote_ident(part))
    }
}

impl FromStr for TableName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = parse_qualified_name(s)?;
        match parts.len() {
            1 => Ok(TableName::new("public", parts.remove(0))),
            2 => {
                let name = parts.remove(1);
                Ok(TableName::new(parts.remove(0), name))
            }
            _ => Err(format!(
                "{s:?} is not a table name: write \"schema.table\" (or just \"table\" for public)"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for TableName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A column of a table, written `schema.table.column` in full.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ColumnName {
    pub table: TableName,
    pub column: String,
}

impl fmt::Display for ColumnName {
    /// As the config writes it, each part double-quoted only where it must be.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.", self.table)?;
        write_part(f, &self.column)
    }
}

impl FromStr for ColumnName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = parse_qualified_name(s)?;
        if parts.len() != 3 {
            return Err(format!(
                "{s:?} is not a column name: write it in full as \"schema.table.column\""
            ));
        }
        let column = parts.remove(2);
        let name = parts.remove(1);
        Ok(ColumnName {
            table: TableName::new(parts.remove(0), name),
            column,
        })
    }
}

impl<'de> Deserialize<'de> for ColumnName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Replication slot names allow lower-case letters, digits and underscores, at most 63 bytes.
/// Publications are held to the same rule so that neither ever needs quoting.
pub(super) fn check_slot_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty; use lower-case letters, digits and underscores");
    }
    if name.len() > MAX_IDENTIFIER_BYTES {
        return Err("it is longer than 63 bytes; use a shorter name");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err("use only lower-case letters, digits and underscores");
    }
    Ok(())
}

/// Splits a dotted SQL name into its parts: unquoted parts are folded to lower case and must be
/// plain identifiers; double-quoted parts are kept as written, `""` standing for one `"`.
pub(super) fn parse_qualified_name(text: &str) -> Result<Vec<String>, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("the name is empty".into());
    }
    let mut parts = Vec::new();
    let mut chars = trimmed.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err(format!("{text:?} has an unterminated double quote")),
                }
            }
            if part.is_empty() {
                return Err(format!("{text:?} has an empty quoted identifier (\"\")"));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if !(c.is_alphanumeric() || c == '_' || c == '$') {
                    return Err(format!(
                        "{text:?} has the character {c:?} outside double quotes: write that part as \"...\""
                    ));
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
            match part.chars().next() {
                None => return Err(format!("{text:?} has an empty part")),
                Some(first) if first.is_ascii_digit() || first == '$' => {
                    return Err(format!(
                        "{text:?}: the unquoted part {part:?} must start with a letter or underscore"
                    ));
                }
                Some(_) => {}
            }
        }
        if part.len() > MAX_IDENTIFIER_BYTES {
            return Err(format!(
                "{text:?}: the part {part:?} is longer than 63 bytes, which PostgreSQL would truncate"
            ));
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => {}
            Some(c) => {
                return Err(format!(
                    "{text:?} has {c:?} after a quoted part: separate parts with '.'"
                ));
            }
        }
    }
}

/// A single column name, by the same rules as [`parse_qualified_name`].
pub(super) fn parse_identifier(text: &str) -> Result<String, String> {
    let mut parts = parse_qualified_name(text)?;
    if parts.len() != 1 {
        return Err(format!(
            "{text:?} is not a single column name: give the column alone (quote it if it contains '.')"
        ));
    }
    Ok(parts.remove(0))
}
