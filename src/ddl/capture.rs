//! Capturing schema changes on staging: an event trigger that `init` installs (one per
//! publication, in staging's `stagingprop` schema) and that, at the end of every DDL command
//! changing a table of the publication, compares the table's shape with the one it recorded
//! last and, when they differ, emits the change as a transactional logical message
//! ([`super::PREFIX`]) and records the new shape, in the command's own transaction. Event
//! triggers need a superuser.

use tokio_postgres::Client;

use crate::config::{TableName, TablePattern};
use crate::quote::{quote_ident, quote_literal};

/// The schema on staging that holds the trigger's function and the shapes it recorded.
const SCHEMA: &str = "stagingprop";

/// The event trigger's name for a publication (publication names need no quoting).
fn trigger_name(publication: &str) -> String {
    format!("stagingprop_ddl_{publication}")
}

fn function_name(publication: &str) -> String {
    format!(
        "{}.{}",
        quote_ident(SCHEMA),
        quote_ident(&format!("capture_ddl_{publication}"))
    )
}

/// The tables of `publication`, as a SQL condition on `rel` (an oid).
fn in_publication(publication: &str, rel: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid \
                 WHERE p.pubname = {} AND r.prrelid = {rel})",
        quote_literal(publication)
    )
}

/// Installs (or replaces) the trigger of `publication` and records the current shape of each of
/// its tables. Run it whenever the publication's tables change.
pub async fn install(
    client: &Client,
    publication: &str,
    patterns: &[TablePattern],
) -> Result<(), tokio_postgres::Error> {
    let schema = quote_ident(SCHEMA);
    // A table created where a `[[table_patterns]]` entry manages it joins the publication in
    // its creating transaction: its rows from then on are in the stream, after its creation.
    let patterned = if patterns.is_empty() {
        "false".to_owned()
    } else {
        patterns
            .iter()
            .map(|p| p.sql_condition("n.nspname", "c.relname"))
            .collect::<Vec<_>>()
            .join(" OR ")
    };
    let publication_literal = quote_literal(publication);
    let function = function_name(publication);
    let trigger = quote_ident(&trigger_name(publication));
    let drop_trigger = quote_ident(&format!("{}_drop", trigger_name(publication)));
    let drop_function = format!(
        "{}.{}",
        schema,
        quote_ident(&format!("capture_drop_{publication}"))
    );
    let managed = in_publication(publication, "rel");
    let sql = format!(
        r#"
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE SEQUENCE IF NOT EXISTS {schema}.change_ids;
-- change_id: the last change captured of the table (none since installation: NULL); sync
-- records the ids it applied, so a difference it finds at start is known to be on its way.
CREATE TABLE IF NOT EXISTS {schema}.shapes (
    publication text NOT NULL,
    relid oid NOT NULL,
    shape jsonb NOT NULL,
    change_id bigint,
    PRIMARY KEY (publication, relid));
CREATE OR REPLACE FUNCTION {schema}.shape_of(rel oid) RETURNS jsonb LANGUAGE sql STABLE
  SET search_path = pg_catalog, pg_temp AS $f$
  SELECT jsonb_build_object('schema', n.nspname, 'name', c.relname, 'columns',
         coalesce((SELECT jsonb_agg(jsonb_build_object(
                    'attnum', a.attnum, 'name', a.attname,
                    'type', format_type(a.atttypid, a.atttypmod), 'not_null', a.attnotnull,
                    'default', pg_get_expr(d.adbin, d.adrelid),
                    'identity', a.attidentity::text, 'generated', a.attgenerated::text)
                    ORDER BY a.attnum)
                     FROM pg_attribute a
                     LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
                  '[]'::jsonb),
         'partitioned', c.relkind = 'p',
         'primary_key',
         (SELECT jsonb_build_object('name', k.conname,
                   'columns', (SELECT jsonb_agg(a.attname ORDER BY u.n)
                                 FROM unnest(k.conkey) WITH ORDINALITY u(attnum, n)
                                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = u.attnum))
            FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'p'),
         -- Secondary indexes: those backing a constraint come with the constraint.
         'indexes',
         coalesce((SELECT jsonb_agg(jsonb_build_object(
                    'name', ic.relname, 'definition', pg_get_indexdef(i.indexrelid),
                    'columns', (SELECT coalesce(jsonb_agg(a.attname ORDER BY k.n), '[]'::jsonb)
                                  FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, n)
                                  JOIN pg_attribute a
                                    ON a.attrelid = i.indrelid AND a.attnum = k.attnum),
                    'expressions', i.indexprs IS NOT NULL OR i.indpred IS NOT NULL)
                    ORDER BY ic.relname)
                     FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                    WHERE i.indrelid = c.oid AND NOT i.indisprimary
                      AND NOT EXISTS (SELECT 1 FROM pg_constraint k
                                       WHERE k.conindid = i.indexrelid AND k.conrelid = c.oid)),
                  '[]'::jsonb),
         'constraints',
         coalesce((SELECT jsonb_agg(jsonb_build_object(
                    'name', k.conname, 'type', k.contype::text,
                    'definition', pg_get_constraintdef(k.oid),
                    'columns', (SELECT coalesce(jsonb_agg(a.attname), '[]'::jsonb)
                                  FROM unnest(k.conkey) u(attnum)
                                  JOIN pg_attribute a
                                    ON a.attrelid = c.oid AND a.attnum = u.attnum),
                    -- A foreign key's referenced table and columns, pairwise with its own
                    -- (sync finds the references of remapped keys in them).
                    'references',
                    CASE WHEN k.contype = 'f' THEN
                      (SELECT jsonb_build_object(
                                'schema', rn.nspname, 'name', rc.relname,
                                'columns', (SELECT jsonb_agg(ra.attname ORDER BY u.n)
                                              FROM unnest(k.confkey) WITH ORDINALITY u(attnum, n)
                                              JOIN pg_attribute ra
                                                ON ra.attrelid = k.confrelid AND ra.attnum = u.attnum),
                                'own', (SELECT jsonb_agg(oa.attname ORDER BY u.n)
                                          FROM unnest(k.conkey) WITH ORDINALITY u(attnum, n)
                                          JOIN pg_attribute oa
                                            ON oa.attrelid = c.oid AND oa.attnum = u.attnum))
                         FROM pg_class rc JOIN pg_namespace rn ON rn.oid = rc.relnamespace
                        WHERE rc.oid = k.confrelid)
                    END)
                    ORDER BY k.conname)
                     FROM pg_constraint k
                    WHERE k.conrelid = c.oid AND k.contype IN ('c', 'u', 'f', 'x')),
                  '[]'::jsonb))
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel
$f$;
-- SECURITY DEFINER: whoever runs the DDL, the function records shapes and emits the message
-- with the rights of the superuser who installed it.
CREATE OR REPLACE FUNCTION {function}() RETURNS event_trigger LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
  rel oid;
  before jsonb;
  after jsonb;
  changes jsonb := '[]';
  id bigint;
  created oid[] := '{{}}';
  has_rows boolean;
BEGIN
  FOR rel IN
    SELECT DISTINCT c.oid FROM pg_event_trigger_ddl_commands() d
      JOIN pg_class c ON c.oid = d.objid JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE d.classid = 'pg_class'::regclass AND d.object_type = 'table'
       AND d.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
       AND c.relkind IN ('r', 'p') AND NOT c.relispartition AND NOT {managed_c}
       AND ({patterned})
  LOOP
    IF tg_tag <> 'CREATE TABLE' THEN
      -- Its rows were written before it joined the publication: they would never reach
      -- production.
      EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', rel::regclass) INTO has_rows;
      IF has_rows THEN
        RAISE EXCEPTION 'stagingprop: % is created with rows (%), which would not reach production', rel::regclass, tg_tag
          USING HINT = 'create the table empty (CREATE TABLE ... (LIKE ...), or WITH NO DATA), then fill it with INSERT ... SELECT';
      END IF;
    END IF;
    EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', {publication_literal}, rel::regclass);
    created := created || rel;
  END LOOP;
  FOR rel IN
    SELECT DISTINCT CASE WHEN c.object_type = 'index'
                         THEN (SELECT i.indrelid FROM pg_index i WHERE i.indexrelid = c.objid)
                         ELSE c.objid END
      FROM pg_event_trigger_ddl_commands() c
     WHERE c.classid = 'pg_class'::regclass
  LOOP
    CONTINUE WHEN rel IS NULL OR NOT {managed};
    SELECT s.shape INTO before FROM {schema}.shapes s
     WHERE s.publication = {publication_literal} AND s.relid = rel;
    after := {schema}.shape_of(rel);
    IF before IS DISTINCT FROM after THEN
      IF before IS NOT NULL OR rel = ANY (created) THEN
        id := coalesce(id, nextval('{schema}.change_ids'));
        changes := changes || jsonb_build_array(jsonb_build_object('before', before, 'after', after));
      END IF;
      INSERT INTO {schema}.shapes VALUES ({publication_literal}, rel, after,
                                          CASE WHEN before IS NOT NULL OR rel = ANY (created) THEN id END)
        ON CONFLICT (publication, relid)
        DO UPDATE SET shape = excluded.shape, change_id = excluded.change_id;
    END IF;
  END LOOP;
  IF jsonb_array_length(changes) > 0 THEN
    PERFORM pg_logical_emit_message(true, '{prefix}',
      jsonb_build_object('id', id, 'tag', tg_tag, 'statement', current_query(),
                         'tables', changes)::text);
  END IF;
END
$f$;
CREATE OR REPLACE FUNCTION {drop_function}() RETURNS event_trigger LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
  dropped record;
  after jsonb;
  id bigint;
  changes jsonb := '[]';
BEGIN
  FOR dropped IN
    SELECT s.relid, s.shape FROM pg_event_trigger_dropped_objects() o
      JOIN {schema}.shapes s ON s.relid = o.objid AND s.publication = {publication_literal}
     WHERE o.classid = 'pg_class'::regclass AND o.object_type = 'table'
  LOOP
    changes := changes || jsonb_build_array(jsonb_build_object('before', dropped.shape, 'after', NULL));
    DELETE FROM {schema}.shapes WHERE publication = {publication_literal} AND relid = dropped.relid;
  END LOOP;
  -- A dropped index is gone from the catalogs by now: its table is the one whose recorded
  -- shape lists it (ddl_command_end does not report DROP INDEX).
  FOR dropped IN
    SELECT DISTINCT s.relid, s.shape FROM pg_event_trigger_dropped_objects() o
      JOIN {schema}.shapes s ON s.publication = {publication_literal}
       AND s.shape->>'schema' = o.schema_name
       AND s.shape->'indexes' @> jsonb_build_array(jsonb_build_object('name', o.object_name))
     WHERE o.classid = 'pg_class'::regclass AND o.object_type = 'index'
       AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = s.relid)
  LOOP
    after := {schema}.shape_of(dropped.relid);
    CONTINUE WHEN after IS NOT DISTINCT FROM dropped.shape;
    id := coalesce(id, nextval('{schema}.change_ids'));
    changes := changes || jsonb_build_array(jsonb_build_object('before', dropped.shape, 'after', after));
    UPDATE {schema}.shapes SET shape = after, change_id = id
     WHERE publication = {publication_literal} AND relid = dropped.relid;
  END LOOP;
  IF jsonb_array_length(changes) > 0 THEN
    PERFORM pg_logical_emit_message(true, '{prefix}',
      jsonb_build_object('id', id, 'tag', tg_tag, 'statement', current_query(),
                         'tables', changes)::text);
  END IF;
END
$f$;
DROP EVENT TRIGGER IF EXISTS {trigger};
CREATE EVENT TRIGGER {trigger} ON ddl_command_end EXECUTE FUNCTION {function}();
DROP EVENT TRIGGER IF EXISTS {drop_trigger};
CREATE EVENT TRIGGER {drop_trigger} ON sql_drop EXECUTE FUNCTION {drop_function}();
DELETE FROM {schema}.shapes s WHERE s.publication = {publication_literal}
   AND NOT {in_publication_s};
INSERT INTO {schema}.shapes
  SELECT {publication_literal}, r.prrelid, {schema}.shape_of(r.prrelid)
    FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
   WHERE p.pubname = {publication_literal}
  ON CONFLICT (publication, relid) DO UPDATE
    SET shape = excluded.shape,
        change_id = CASE WHEN shapes.shape = excluded.shape THEN shapes.change_id END;
"#,
        prefix = super::PREFIX,
        managed_c = in_publication(publication, "c.oid"),
        in_publication_s = in_publication(publication, "s.relid"),
    );
    client.batch_execute("BEGIN").await?;
    match client.batch_execute(&sql).await {
        Ok(()) => client.batch_execute("COMMIT").await,
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Removes the trigger of `publication` and what it recorded (the schema stays: other
/// publications' triggers may use it).
pub async fn remove(client: &Client, publication: &str) -> Result<(), tokio_postgres::Error> {
    let schema = quote_ident(SCHEMA);
    let shapes_exist: bool = client
        .query_one("SELECT to_regclass('stagingprop.shapes') IS NOT NULL", &[])
        .await?
        .get(0);
    let mut sql = format!(
        "DROP EVENT TRIGGER IF EXISTS {}; DROP EVENT TRIGGER IF EXISTS {}; \
         DROP FUNCTION IF EXISTS {}(); DROP FUNCTION IF EXISTS {}.{}();",
        quote_ident(&trigger_name(publication)),
        quote_ident(&format!("{}_drop", trigger_name(publication))),
        function_name(publication),
        schema,
        quote_ident(&format!("capture_drop_{publication}")),
    );
    if shapes_exist {
        sql.push_str(&format!(
            " DELETE FROM {schema}.shapes WHERE publication = {};",
            quote_literal(publication)
        ));
    }
    client.batch_execute(&sql).await
}

/// Whether the trigger of `publication` is installed and enabled.
pub async fn installed(client: &Client, publication: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = $1 AND evtenabled <> 'D')",
            &[&trigger_name(publication)],
        )
        .await?
        .get(0))
}

/// The last change captured of each table of `publication` (table, change id), for the tables
/// that changed since the trigger was installed; none without the capture (or without the right
/// to read what it recorded).
pub async fn last_changes(
    client: &Client,
    publication: &str,
) -> Result<Vec<(TableName, i64)>, tokio_postgres::Error> {
    let readable: bool = client
        .query_one(
            "SELECT coalesce(has_table_privilege(to_regclass('stagingprop.shapes'), 'SELECT'), false)",
            &[],
        )
        .await?
        .get(0);
    if !readable {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!(
                "SELECT shape->>'schema', shape->>'name', change_id FROM {}.shapes \
                 WHERE publication = $1 AND change_id IS NOT NULL",
                quote_ident(SCHEMA)
            ),
            &[&publication],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                r.get(2),
            )
        })
        .collect())
}
