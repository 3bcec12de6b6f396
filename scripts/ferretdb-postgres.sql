-- Applied to the PostgreSQL that backs FerretDB 1.24 (by scripts/services and the test suites).
--
-- FerretDB pushes an equality filter down as `_jsonb->$1 @> $2`, a prepared statement. The
-- btree FerretDB creates on `_jsonb->'_id'` cannot serve `@>`, and a generic plan (which
-- PostgreSQL picks for a statement after five runs) cannot use an expression index at all:
-- every lookup by `_id` read the whole table (26 ms at 100 000 documents, measured). With a GIN
-- index per collection on `_jsonb->'_id'` (no pending list: lookups would scan it) and custom
-- plans, the same lookup takes 0.6 ms.
-- The same for `track`, the field the worker counts liked pairs by and history reads by.
-- A real MongoDB needs none of this (its indexes serve these queries).
ALTER SYSTEM SET plan_cache_mode = force_custom_plan;
SELECT pg_reload_conf();

CREATE OR REPLACE FUNCTION fanfare_index_ferretdb_ids() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
  created record;
BEGIN
  FOR created IN SELECT * FROM pg_event_trigger_ddl_commands()
                 WHERE command_tag = 'CREATE TABLE' AND schema_name <> 'public' LOOP
    IF EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = created.objid AND attname = '_jsonb' AND NOT attisdropped) THEN
      EXECUTE format('CREATE INDEX ON %s USING gin ((_jsonb -> ''_id'') jsonb_path_ops) WITH (fastupdate = off)',
                     created.object_identity);
      EXECUTE format('CREATE INDEX ON %s USING gin ((_jsonb -> ''track'') jsonb_path_ops) WITH (fastupdate = off)',
                     created.object_identity);
    END IF;
  END LOOP;
END
$$;

DROP EVENT TRIGGER IF EXISTS fanfare_index_ferretdb_ids;
CREATE EVENT TRIGGER fanfare_index_ferretdb_ids ON ddl_command_end
  WHEN TAG IN ('CREATE TABLE') EXECUTE FUNCTION fanfare_index_ferretdb_ids();
