-- Convert a plain `records` table into the layout of `wbcache migrate --hash-partitions N`:
-- PARTITION BY HASH (collection, key) into N partitions records_p0 ... records_p<N-1>.
-- docs/scaling.md, "Past one Postgres", says when and how (an offline job: stop the
-- workers first; reads of uncached keys go on from the old table until the swap commits).
--
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -v partitions=16 -f hash_partition_records.sql
--
-- One transaction: on any error nothing has changed. The old table stays, renamed
-- records_plain, until you drop it. Afterwards `wbcache migrate --hash-partitions 16`
-- accepts the database (and any other N is refused).

BEGIN;
SELECT set_config('wbcache.hash_partitions', :'partitions', true);

-- Flushes (a worker left running, a Write-Mode: through request) wait; reads go on.
LOCK TABLE records IN EXCLUSIVE MODE;

DO $$
DECLARE
    n int := current_setting('wbcache.hash_partitions')::int;
BEGIN
    IF n < 2 OR n > 1024 THEN
        RAISE EXCEPTION 'partitions must be 2 to 1024, not %', n;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'records'::regclass) THEN
        RAISE EXCEPTION 'records is already partitioned';
    END IF;
    -- The same columns, defaults, constraints and indexes (the primary key included).
    EXECUTE 'CREATE TABLE records_new (LIKE records INCLUDING ALL) '
            'PARTITION BY HASH (collection, key)';
    FOR i IN 0 .. n - 1 LOOP
        EXECUTE format('CREATE TABLE records_new_p%s PARTITION OF records_new '
                       'FOR VALUES WITH (MODULUS %s, REMAINDER %s)', i, n, i);
    END LOOP;

    INSERT INTO records_new SELECT * FROM records;

    -- Swap the names: the old table and its indexes become records_plain*, the new ones
    -- take the names the migrations gave (records, records_pkey) and records_p<i>.
    -- (IF EXISTS: the byte-order index of listing comes with migration 0002.)
    ALTER TABLE records RENAME TO records_plain;
    ALTER INDEX records_pkey RENAME TO records_plain_pkey;
    ALTER INDEX IF EXISTS records_collection_key_idx RENAME TO records_plain_collection_key_idx;
    ALTER TABLE records_new RENAME TO records;
    ALTER INDEX records_new_pkey RENAME TO records_pkey;
    ALTER INDEX IF EXISTS records_new_collection_key_idx RENAME TO records_collection_key_idx;
    FOR i IN 0 .. n - 1 LOOP
        EXECUTE format('ALTER TABLE records_new_p%s RENAME TO records_p%s', i, i);
        EXECUTE format('ALTER INDEX records_new_p%s_pkey RENAME TO records_p%s_pkey', i, i);
        EXECUTE format('ALTER INDEX IF EXISTS records_new_p%s_collection_key_idx '
                       'RENAME TO records_p%s_collection_key_idx', i, i);
    END LOOP;
END
$$;

COMMIT;
ANALYZE records;
-- Check, then: DROP TABLE records_plain;
