-- xrates schema, version sequence, trigger functions and triggers.
-- Idempotent: every process may apply it at start-up (under an advisory lock, see util.py).
-- Requires PostgreSQL 14+ (CREATE OR REPLACE TRIGGER).

-- The notification channel. Python's model.CHANNEL must equal this (a test checks it).
CREATE OR REPLACE FUNCTION xrates_channel() RETURNS text
    LANGUAGE sql IMMUTABLE AS $$ SELECT 'xrates'::text $$;

-- One global sequence orders every change of every key: for one key, a higher version
-- is always the later committed state (see "Version order and lock order" below).
CREATE SEQUENCE IF NOT EXISTS rate_version_seq;

CREATE TABLE IF NOT EXISTS rate (
    base       char(3)     NOT NULL CHECK (base ~ '^[A-Z]{3}$'),
    quote      char(3)     NOT NULL CHECK (quote ~ '^[A-Z]{3}$'),
    rate       numeric     NOT NULL CHECK (rate >= 1e-12 AND rate < 1e12),
    source     text        NOT NULL CHECK (source ~ '^[a-z][a-z0-9_-]{0,31}$'),
    as_of      timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    version    bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (base, quote),
    CHECK (base <> quote)
);
-- The primary key finds a currency's rows as base; this finds them as quote (a conversion's
-- rows around its two ends when the table is larger than the cache: model._path_records).
CREATE INDEX IF NOT EXISTS rate_quote ON rate (quote);

-- ---------------------------------------------------------------- version order and lock order
-- The hazard: an INSERT draws its version in its BEFORE trigger and only then, in the unique
-- check, may wait for a concurrent transaction that deletes the same key. When that delete
-- commits, the insert goes on with a version drawn *before* the delete's tombstone: the later
-- state would carry the lower version. A key lock taken before drawing (the old per-key
-- advisory lock) fixes that order but deadlocks against any transaction that already holds
-- the row (DELETE then INSERT of one key), since UPDATE and DELETE lock the row before their
-- BEFORE triggers run.
--
-- The scheme: a per-key version floor written by deletes, checked after the unique check.
--   * BEFORE INSERT / BEFORE UPDATE draw nextval and take no lock of their own. An UPDATE
--     (also ON CONFLICT DO UPDATE) fires its BEFORE trigger with the row already locked.
--   * BEFORE DELETE fires with the row locked too; it draws the tombstone there and records
--     it as the key's floor in rate_floor (keeping the greater version).
--   * After an INSERT statement (and a COPY) every unique check has passed, so every
--     transaction that deleted one of its keys before it has committed and its floor is
--     visible (READ COMMITTED: each statement of a trigger takes a new snapshot). A row whose
--     version is below its key's floor is re-drawn (UPDATE of our own row: the BEFORE UPDATE
--     trigger draws again), which puts it above the tombstone.
-- Locks, in the one order every statement of every transaction shape follows:
--   rate row / unique-index entry of a key  ->  rate_floor row of the same key.
-- A floor row is taken only by a transaction that owns its key at that moment: a deleter
-- right after locking the key's row, an inserter after its unique check passed (its own
-- uncommitted row is then the key's only one). Two transactions cannot own one key at once,
-- so a floor-row lock never waits, and our triggers add no wait cycle: any deadlock left is
-- one the same statements hit on a plain table (e.g. two transactions taking two keys in
-- opposite orders). No advisory locks: a 20,000-row INSERT or COPY needs no lock-table entry
-- per row (row locks live in the rows).
--
-- Caveat for callers: INSERT ... RETURNING is computed before the statement's AFTER trigger,
-- so for a re-drawn row it shows the first draw. A writer that needs the final version (an
-- API's own cache entry, X-Xrates-Version) reads the row again in the same transaction.
--
-- Retention: a floor is needed only while an INSERT of its key could still carry a version
-- drawn before the tombstone, i.e. until the key's next successful insert. The INSERT
-- statement that passes the key's unique check (it waited for the deleter, or came after
-- it) deletes the key's floor once it has compared with it; the deletion is part of the
-- inserting transaction, so if that transaction rolls back the floor comes back, and any
-- other pending inserter of the key now waits for this row (then fails the unique check or
-- turns into ON CONFLICT's UPDATE, which draws under the row lock). What stays is one small
-- row per pair that was deleted and not inserted since: bounded by the number of pairs.
-- A time-based rule ("older than N minutes") would not be safe: one multi-row INSERT can
-- wait on a later key for an unbounded time after an earlier key's deleter committed.
--
-- REPEATABLE READ / SERIALIZABLE inserters cannot see a floor committed after their snapshot
-- (their INSERT still succeeds once the deleter committed), so they re-draw every row they
-- insert: always above any tombstone, at the cost of one UPDATE per row. They leave the
-- floors in place (deleting a floor their snapshot cannot see would be a serialization
-- failure the same INSERT never hits on a plain table); the next READ COMMITTED insert of
-- the key drops it.
CREATE TABLE IF NOT EXISTS rate_floor (
    base    char(3) NOT NULL,
    quote   char(3) NOT NULL,
    version bigint  NOT NULL,  -- the key's last tombstone
    PRIMARY KEY (base, quote)
);

CREATE OR REPLACE FUNCTION rate_before_insert() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := nextval('rate_version_seq');  -- checked against the floor after the statement
    NEW.updated_at := now();
    RETURN NEW;
END $$;

-- UPDATE: the row is already locked when a BEFORE ROW trigger fires, so drawing here is safe.
CREATE OR REPLACE FUNCTION rate_before_update() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.base IS DISTINCT FROM OLD.base OR NEW.quote IS DISTINCT FROM OLD.quote THEN
        RAISE EXCEPTION 'the pair of a rate is immutable: delete it and insert the new pair'
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.version := nextval('rate_version_seq');
    NEW.updated_at := now();
    RETURN NEW;
END $$;

-- DELETE: the row is locked (row locks last until commit), so the tombstone drawn here is
-- above every earlier version of the key, and any later state of the key either waits for
-- our row (UPDATE, DELETE, the unique check of an INSERT) and draws later, or drew earlier and
-- is re-drawn above this floor by rate_notify_insert.
CREATE OR REPLACE FUNCTION rate_before_delete() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rate_floor AS f (base, quote, version)
    VALUES (OLD.base, OLD.quote, nextval('rate_version_seq'))
    ON CONFLICT (base, quote) DO UPDATE SET version = greatest(f.version, EXCLUDED.version);
    RETURN OLD;
END $$;

-- ---------------------------------------------------------------- notifications
-- Statement-level: the payload carries whole rows, so instances apply it without reading the
-- database. Shapes: {"op":"u","rows":[[key, version, rate text, source, as_of, updated_at],..]},
-- {"op":"d","rows":[[key, tombstone version],..]}, {"op":"flush","version":v,..}.
-- Every payload is unique (each row state has its own version, a flush draws one): PostgreSQL
-- delivers identical payloads of one transaction only once.
--
-- Chunked by bytes: PostgreSQL rejects a payload of 8000 bytes or more, and a row's size
-- depends on its rate text, which plain SQL can make thousands of digits long (the CHECK
-- bounds the value, not the scale). Rows (JSON arrays) are packed greedily. A row that cannot
-- fit in any payload on its own is sent as a flush instead: every cache drops everything and
-- re-reads, which is correct; failing the write would not be.
CREATE OR REPLACE FUNCTION xrates_notify_rows(p_op text, p_rows text[]) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    max_bytes constant integer := 7999;
    head      constant text := '{"op":"' || p_op || '","rows":[';
    room      constant integer := max_bytes - octet_length(head) - 2;  -- 2: the closing ']}'
    buf       text := '';
    used      integer := 0;
    item      text;
    size      integer;
BEGIN
    FOREACH item IN ARRAY coalesce(p_rows, '{}') LOOP
        size := octet_length(item);
        IF size > room THEN
            PERFORM pg_notify(xrates_channel(), '{"op":"flush","version":'
                || nextval('rate_version_seq') || ',"reason":"row too large"}');
            CONTINUE;
        END IF;
        IF used > 0 AND used + 1 + size > room THEN
            PERFORM pg_notify(xrates_channel(), head || buf || ']}');
            buf := '';
            used := 0;
        END IF;
        IF used = 0 THEN
            buf := item;
            used := size;
        ELSE
            buf := buf || ',' || item;
            used := used + 1 + size;
        END IF;
    END LOOP;
    IF used > 0 THEN
        PERFORM pg_notify(xrates_channel(), head || buf || ']}');
    END IF;
END $$;

-- AFTER INSERT (statement; COPY too): every unique check of the statement has passed. Re-draw
-- the rows whose version is below their key's floor (see "version order" above), notify the
-- rest, and drop the floors of the inserted keys.
-- The transition table holds each row as it was inserted: a re-drawn row's new version is
-- not in it, so re-drawn rows are left to the nested UPDATE's own notification
-- (rate_notify_update, fired by that UPDATE with the final version) and skipped here.
CREATE OR REPLACE FUNCTION rate_notify_insert() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    redrawn text[];
    payload_rows text[];
BEGIN
    IF current_setting('transaction_isolation') = 'read committed' THEN
        WITH r AS (
            UPDATE rate t SET version = t.version
            FROM changed_rows c JOIN rate_floor f ON f.base = c.base AND f.quote = c.quote
            WHERE t.base = c.base AND t.quote = c.quote AND t.version = c.version
              AND f.version > c.version
            RETURNING t.base || t.quote AS key)
        SELECT array_agg(key) INTO redrawn FROM r;
        DELETE FROM rate_floor f USING changed_rows c
        WHERE f.base = c.base AND f.quote = c.quote;
    ELSE  -- a floor committed after our snapshot is invisible: re-draw every row
        -- (t.version = c.version: only our own row; our snapshot may still show the key's
        -- deleted row, and touching that one would be a serialization failure)
        UPDATE rate t SET version = t.version FROM changed_rows c
        WHERE t.base = c.base AND t.quote = c.quote AND t.version = c.version;
        RETURN NULL;
    END IF;
    SELECT array_agg(json_build_array(base || quote, version, rate::text, source, as_of,
                                      updated_at)::text)
    INTO payload_rows
    FROM changed_rows
    WHERE redrawn IS NULL OR NOT (base || quote = ANY (redrawn));
    PERFORM xrates_notify_rows('u', payload_rows);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION rate_notify_upsert() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM xrates_notify_rows('u', (
        SELECT array_agg(json_build_array(base || quote, version, rate::text, source, as_of,
                                          updated_at)::text)
        FROM changed_rows));
    RETURN NULL;
END $$;

-- AFTER DELETE (statement): each row's tombstone is its key's floor, written by
-- rate_before_delete in this statement; this transaction holds that floor row until commit.
CREATE OR REPLACE FUNCTION rate_notify_delete() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM xrates_notify_rows('d', (
        SELECT array_agg(json_build_array(c.base || c.quote, f.version)::text)
        FROM changed_rows c JOIN rate_floor f ON f.base = c.base AND f.quote = c.quote));
    RETURN NULL;
END $$;

-- TRUNCATE: caches drop everything. The flush carries a fresh version so that two TRUNCATEs
-- in one transaction send two payloads (identical ones would be folded into one, and a row
-- inserted between them would survive in caches). TRUNCATE waits for every transaction that
-- uses the table, so no inserter can hold an older version across it: no floors needed.
CREATE OR REPLACE FUNCTION rate_notify_truncate() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(xrates_channel(),
                      '{"op":"flush","version":' || nextval('rate_version_seq') || '}');
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER rate_before_insert BEFORE INSERT ON rate
    FOR EACH ROW EXECUTE FUNCTION rate_before_insert();
CREATE OR REPLACE TRIGGER rate_before_update BEFORE UPDATE ON rate
    FOR EACH ROW EXECUTE FUNCTION rate_before_update();
CREATE OR REPLACE TRIGGER rate_before_delete BEFORE DELETE ON rate
    FOR EACH ROW EXECUTE FUNCTION rate_before_delete();
CREATE OR REPLACE TRIGGER rate_notify_insert AFTER INSERT ON rate
    REFERENCING NEW TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rate_notify_insert();
CREATE OR REPLACE TRIGGER rate_notify_update AFTER UPDATE ON rate
    REFERENCING NEW TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rate_notify_upsert();
CREATE OR REPLACE TRIGGER rate_notify_delete AFTER DELETE ON rate
    REFERENCING OLD TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rate_notify_delete();
CREATE OR REPLACE TRIGGER rate_notify_truncate AFTER TRUNCATE ON rate
    FOR EACH STATEMENT EXECUTE FUNCTION rate_notify_truncate();

-- Delete one rate and return its tombstone's version (NULL if there was no such rate), so
-- the deleting instance can put the exact tombstone in its own cache at once. The tombstone
-- is the key's floor, which this transaction now holds locked until it ends.
CREATE OR REPLACE FUNCTION rate_delete(p_base text, p_quote text) RETURNS bigint
    LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM rate WHERE base = p_base AND quote = p_quote;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN (SELECT version FROM rate_floor WHERE base = p_base AND quote = p_quote);
END $$;

-- Update runs: the updater's job queue and history (see updater.py, GET /v1/updates).
CREATE TABLE IF NOT EXISTS update_run (
    id             bigserial   PRIMARY KEY,
    status         text        NOT NULL DEFAULT 'queued'
                               CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    trigger        text        NOT NULL CHECK (trigger IN ('schedule', 'manual')),
    requested      text[],     -- sources asked for; NULL means every configured source
    progress_done  integer     NOT NULL DEFAULT 0,
    progress_total integer     NOT NULL DEFAULT 0,
    sources        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    finished_at    timestamptz,
    error          text,
    runner         text        -- which updater process ran it (host:pid)
);
CREATE INDEX IF NOT EXISTS update_run_status_id ON update_run (status, id);

-- A queued run wakes the leading updater at once (it LISTENs on this channel).
CREATE OR REPLACE FUNCTION update_run_notify_queued() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('xrates_runs', NEW.id::text);
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER update_run_notify_queued AFTER INSERT ON update_run
    FOR EACH ROW WHEN (NEW.status = 'queued') EXECUTE FUNCTION update_run_notify_queued();

-- When the leading updater's next scheduled run is due (GET /v1/sources "next_run"). One row:
-- each leader replaces it whenever it starts a scheduled run (updater.py). The API shows it only
-- while some session holds the leader lock, so a dead leader's promise is never reported.
CREATE TABLE IF NOT EXISTS updater_schedule (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    next_run   timestamptz NOT NULL,
    runner     text        NOT NULL,  -- the leader that recorded it (host:pid)
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------- history
-- Every value any source published for a day: (source, base, quote, day), day = the UTC date of
-- as_of. Written by whoever writes the data, in the same transaction as the current-table write
-- (the updater for every day of a payload, the API for its writes); never derived from `rate`,
-- which keeps only the priority winner. A day keeps the newest value a source gave for it; an
-- identical value changes nothing (see model.HISTORY_UPSERT). Statement triggers notify
-- 'xrates_history' with the sources whose days changed (below): each API instance keeps the
-- Frankfurter source's newest days in memory and drops that copy on such a notification.
CREATE TABLE IF NOT EXISTS rate_history (
    source     text        NOT NULL CHECK (source ~ '^[a-z][a-z0-9_-]{0,31}$'),
    base       char(3)     NOT NULL CHECK (base ~ '^[A-Z]{3}$'),
    quote      char(3)     NOT NULL CHECK (quote ~ '^[A-Z]{3}$'),
    day        date        NOT NULL,
    rate       numeric     NOT NULL CHECK (rate >= 1e-12 AND rate < 1e12),
    as_of      timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, base, quote, day),
    CHECK (base <> quote),
    CHECK (day = (as_of AT TIME ZONE 'UTC')::date)
);
-- Per-pair day lookups across sources (?date=, /history: both directions of a pair).
CREATE INDEX IF NOT EXISTS rate_history_pair_day ON rate_history (base, quote, day);
-- One source's days (the Frankfurter routes: newest day, a day's rows, ranges).
CREATE INDEX IF NOT EXISTS rate_history_source_day ON rate_history (source, day);

-- History changes: {"op":"h","sources":[...]} on 'xrates_history' (listener.HISTORY_CHANNEL),
-- the distinct sources of the statement's rows; {"op":"h","sources":null} after a TRUNCATE
-- (every source). A statement that changed no row sends nothing. Its own channel, so that an
-- instance of an older release (which LISTENs on 'xrates' only) never sees an op it does not
-- know; one connection LISTENs on both, so they arrive in commit order.
CREATE OR REPLACE FUNCTION rate_history_notify() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    changed text;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('xrates_history', '{"op":"h","sources":null}');
        RETURN NULL;
    END IF;
    SELECT json_agg(DISTINCT source)::text INTO changed FROM changed_history;
    IF changed IS NOT NULL THEN
        PERFORM pg_notify('xrates_history', '{"op":"h","sources":' || changed || '}');
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER rate_history_notify_insert AFTER INSERT ON rate_history
    REFERENCING NEW TABLE AS changed_history
    FOR EACH STATEMENT EXECUTE FUNCTION rate_history_notify();
CREATE OR REPLACE TRIGGER rate_history_notify_update AFTER UPDATE ON rate_history
    REFERENCING NEW TABLE AS changed_history
    FOR EACH STATEMENT EXECUTE FUNCTION rate_history_notify();
CREATE OR REPLACE TRIGGER rate_history_notify_delete AFTER DELETE ON rate_history
    REFERENCING OLD TABLE AS changed_history
    FOR EACH STATEMENT EXECUTE FUNCTION rate_history_notify();
CREATE OR REPLACE TRIGGER rate_history_notify_truncate AFTER TRUNCATE ON rate_history
    FOR EACH STATEMENT EXECUTE FUNCTION rate_history_notify();

-- update_run.trigger accepts 'backfill' (python updater.py --backfill). Databases created
-- before carry the inline CHECK of two values: replace it, once (the DO block leaves an
-- already-upgraded constraint alone, so applying this file again takes no table lock).
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'update_run'::regclass AND conname = 'update_run_trigger_check'
          AND pg_get_constraintdef(oid) LIKE '%backfill%'
    ) THEN
        ALTER TABLE update_run DROP CONSTRAINT IF EXISTS update_run_trigger_check;
        ALTER TABLE update_run ADD CONSTRAINT update_run_trigger_check
            CHECK (trigger IN ('schedule', 'manual', 'backfill'));
    END IF;
END $$;
