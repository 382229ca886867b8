# The catalogue both end-to-end sync benchmarks use (sourced, not run): schema, a deterministic
# seed (the same SQL on every cluster gives equal tables), the pgbench OLTP script, and helpers
# that count and fingerprint rows. The sourcing script sets PRODUCTS, BIG_ROWS and WORK first,
# and sources common.sh (q, die).
OFFERS=$(( PRODUCTS * 2 ))
CURRENCIES=$(( (BIG_ROWS + OFFERS - 1) / OFFERS ))
(( CURRENCIES < 2 )) && CURRENCIES=2
(( CURRENCIES <= 99 )) || die "BIG_ROWS too large for PRODUCTS (at most 99 currencies per offer)"

SCHEMA_SQL="
CREATE TABLE catentry (
    catentry_id bigint PRIMARY KEY,
    partnumber varchar(64) NOT NULL UNIQUE,
    member_id bigint NOT NULL,
    buyable int,
    published int,
    lastupdate timestamptz,
    field1 varchar(254),
    attrs jsonb);
CREATE TABLE catentdesc (
    catentry_id bigint NOT NULL REFERENCES catentry,
    language_id int NOT NULL,
    name varchar(128),
    shortdescription varchar(254),
    longdescription text,
    PRIMARY KEY (catentry_id, language_id));
CREATE TABLE offer (
    offer_id bigint PRIMARY KEY,
    catentry_id bigint NOT NULL REFERENCES catentry,
    published int);
CREATE INDEX offer_catentry ON offer (catentry_id);
CREATE TABLE offerprice (
    offer_id bigint NOT NULL REFERENCES offer,
    currency char(3) NOT NULL,
    price numeric(20,5) NOT NULL,
    PRIMARY KEY (offer_id, currency));
CREATE TABLE bench_marker (id int PRIMARY KEY, at timestamptz NOT NULL);
CREATE SEQUENCE newprod_seq START 10000001;
"
SEED_SQL="
INSERT INTO catentry
SELECT i, 'PN-' || lpad(i::text, 9, '0'), 7000000000000000001 + i % 3, 1, 1,
       timestamptz '2024-01-01 00:00:00+00' + i * interval '1 second',
       'field1 ' || md5(i::text),
       jsonb_build_object('color', (ARRAY['red', 'green', 'blue'])[1 + i % 3], 'size', i % 50,
                          'tags', jsonb_build_array('a' || i % 7, 'b' || i % 11))
  FROM generate_series(1, $PRODUCTS) i;
INSERT INTO catentdesc
SELECT i, l, 'Product ' || i || ' (' || l || ')', 'Short description of product ' || i,
       repeat(md5(i::text || l::text), 16)
  FROM generate_series(1, $PRODUCTS) i, (VALUES (-1), (-2)) v(l);
INSERT INTO offer SELECT 2 * i - 2 + k, i, 1 FROM generate_series(1, $PRODUCTS) i, generate_series(1, 2) k;
INSERT INTO offerprice
SELECT o, CASE k WHEN 1 THEN 'USD' WHEN 2 THEN 'EUR' ELSE 'C' || lpad(k::text, 2, '0') END,
       ((o * 37 + k * 101) % 100000) / 100.0 + 0.5
  FROM generate_series(1, $OFFERS) o, generate_series(1, $CURRENCIES) k;
"

# One pgbench transaction: a price change (40%), a description change (25%), a product change
# (10%), a new product with descriptions, offers and prices (20%), a product deleted with
# everything under it (5%). Client c only touches products p with p % CLIENTS == c - 1, so
# clients never wait on each other's locks.
cat >"$WORK/oltp.sql" <<'EOF'
\set r random(1, 100)
\set p :client_id + 1 + :clients * random(0, :products / :clients - 1)
\if :r <= 40
UPDATE offerprice SET price = price + 0.01 WHERE offer_id = 2 * :p - 1 AND currency IN ('USD', 'EUR');
\elif :r <= 65
UPDATE catentdesc SET shortdescription = 'Revised description ' || :p || ' #' || (random() * 1000000)::int
 WHERE catentry_id = :p AND language_id = -1;
\elif :r <= 75
UPDATE catentry SET lastupdate = now(), buyable = 1 - buyable, attrs = attrs || jsonb_build_object('rev', :r)
 WHERE catentry_id = :p;
\elif :r <= 95
BEGIN;
SELECT nextval('newprod_seq') AS n \gset
INSERT INTO catentry VALUES (:n, 'NEW-' || :n, 7000000000000000001, 1, 0, now(), 'new product', '{"new": true}');
INSERT INTO catentdesc VALUES (:n, -1, 'New product ' || :n, 'New', repeat('n', 300)),
                              (:n, -2, 'Nouveau produit ' || :n, 'Nouveau', repeat('f', 300));
INSERT INTO offer VALUES (2 * :n - 1, :n, 1), (2 * :n, :n, 1);
INSERT INTO offerprice SELECT o, c, 19.99 FROM (VALUES (2 * :n - 1), (2 * :n)) a(o), (VALUES ('USD'), ('EUR')) b(c);
COMMIT;
\else
BEGIN;
DELETE FROM offerprice WHERE offer_id IN (2 * :p - 1, 2 * :p);
DELETE FROM offer WHERE catentry_id = :p;
DELETE FROM catentdesc WHERE catentry_id = :p;
DELETE FROM catentry WHERE catentry_id = :p;
COMMIT;
\endif
EOF

TABLES=(catentry catentdesc offer offerprice bench_marker)
declare -A ORDER_BY=([catentry]=catentry_id [catentdesc]="catentry_id, language_id" [offer]=offer_id
                     [offerprice]="offer_id, currency" [bench_marker]=id)

# Rows inserted + updated + deleted in the catalogue tables, from staging's statistics. Waits
# until the figure is stable: a finished session's counters are flushed as its backend exits.
rows_written() {
    local prev=-1 cur
    for _ in $(seq 1 50); do
        cur=$(q staging -c "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables
                             WHERE relname IN ('catentry', 'catentdesc', 'offer', 'offerprice')")
        [[ $cur == "$prev" ]] && { echo "$cur"; return; }
        prev=$cur
        sleep 0.2
    done
    echo "$cur"
}

fingerprint() {
    local name=$1 t out=''
    for t in "${TABLES[@]}"; do
        out+="$t:$(q "$name" -c "SELECT count(*) || '/' || coalesce(md5(string_agg(x::text, '|' ORDER BY ${ORDER_BY[$t]})), '-') FROM $t x") "
    done
    echo "$out"
}

# start_with_seed CLUSTER...: starts each cluster with a database "shop" and loads the schema
# (plus EXTRA_SCHEMA_SQL when set) and seed into all of them at once.
start_with_seed() {
    local c pid pids=()
    for c in "$@"; do
        start_cluster "$c"
        qpg "$c" -c "CREATE DATABASE shop"
    done
    for c in "$@"; do
        q "$c" -c "$SCHEMA_SQL" ${EXTRA_SCHEMA_SQL:+-c "$EXTRA_SCHEMA_SQL"} -c "$SEED_SQL" -c "VACUUM ANALYZE" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || die "loading the seed failed"; done
}

# oltp_backlog LOG: commits BACKLOG_TXNS transactions of the OLTP mix on staging from CLIENTS
# clients (pgbench's output in LOG).
oltp_backlog() {
    "$PGBIN/pgbench" -n -h 127.0.0.1 -p "${PORT[staging]}" -U postgres -c "$CLIENTS" -j "$CLIENTS" \
        -t $(( BACKLOG_TXNS / CLIENTS )) -D products="$PRODUCTS" -D clients="$CLIENTS" -f "$WORK/oltp.sql" shop \
        >"$1" 2>&1 || { cat "$1" >&2; die "pgbench failed"; }
}
