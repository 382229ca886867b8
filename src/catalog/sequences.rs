//! Sequences of identity-keyed tables follow staging: logical replication does not carry
//! sequence values, so production's copies are raised to at least staging's `last_value`
//! (never lowered, so production-allocated values are never handed out twice).

use tokio_postgres::Client;

use crate::config::{Config, KeyRule, TableName};

/// A sequence owned by a managed table (serial or identity column) and its value on staging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceValue {
    pub schema: String,
    pub name: String,
    pub last_value: i64,
}

/// One database's values of the sequences owned by the identity-keyed managed tables.
pub async fn read_owned(
    source: &Client,
    config: &Config,
) -> Result<Vec<SequenceValue>, tokio_postgres::Error> {
    let identity: Vec<&TableName> = config
        .tables
        .iter()
        .filter(|t| t.key == KeyRule::Identity)
        .map(|t| &t.name)
        .collect();
    if identity.is_empty() {
        return Ok(Vec::new());
    }
    let schemas: Vec<&str> = identity.iter().map(|t| t.schema.as_str()).collect();
    let names: Vec<&str> = identity.iter().map(|t| t.name.as_str()).collect();
    let rows = source
        .query(
            "SELECT s.schemaname::text, s.sequencename::text, s.last_value
               FROM pg_depend d
               JOIN pg_class sc ON sc.oid = d.objid AND sc.relkind = 'S'
               JOIN pg_namespace sn ON sn.oid = sc.relnamespace
               JOIN pg_sequences s ON s.schemaname = sn.nspname AND s.sequencename = sc.relname
               JOIN pg_class t ON t.oid = d.refobjid
               JOIN pg_namespace tn ON tn.oid = t.relnamespace
               JOIN unnest($1::text[], $2::text[]) AS m(schema, name)
                 ON m.schema = tn.nspname AND m.name = t.relname
              WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                AND d.deptype IN ('a', 'i') AND s.last_value IS NOT NULL",
            &[&schemas, &names],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| SequenceValue {
            schema: r.get(0),
            name: r.get(1),
            last_value: r.get(2),
        })
        .collect())
}

/// Raises the target's sequences to the given values where they are lower. Returns how many
/// were raised.
pub async fn raise(
    target: &Client,
    values: &[SequenceValue],
) -> Result<u64, tokio_postgres::Error> {
    let mut raised = 0;
    for value in values {
        // format('%I.%I') quotes on the server; setval is not transactional and never lowers here.
        raised += target
            .execute(
                "SELECT setval(format('%I.%I', schemaname, sequencename), $3)
                   FROM pg_sequences
                  WHERE schemaname = $1 AND sequencename = $2 AND coalesce(last_value, 0) < $3",
                &[&value.schema, &value.name, &value.last_value],
            )
            .await?;
    }
    Ok(raised)
}
