-- xrates schema, version sequence, trigger functions and triggers.
-- Idempotent: every process may apply it at start-up (under an advisory lock, see util.py).
-- Requires PostgreSQL 14+ (CREATE OR REPLACE TRIGGER).

-- The notification channel. Python's model.CHANNEL must equal this (a test checks it).
CREATE OR REPLACE FUNCTION xrates_channel() RETURNS text
    LANGUAGE sql IMMUTABLE AS $$ SELECT 'xrates'::text $$;

-- One global sequence orders every change of every key: for one key, a higher version
-- is always the later committed state (see the lock order in rate_before_insert).
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

-- INSERT: lock the key first (advisory, per key), then wait for any writer that holds the
-- existing row (an uncommitted DELETE/UPDATE), and only then draw the version. Without this
-- an INSERT could draw its version, wait on a concurrent DELETE's unique-index entry, and
-- commit a live row whose version is lower than that DELETE's tombstone.
-- Lock order everywhere: key advisory lock (inserts only) -> row lock. UPDATE and DELETE take
-- only the row lock (their BEFORE ROW trigger fires after it), so they never wait on the
-- advisory lock while holding a row and cannot deadlock against INSERT ... ON CONFLICT.
CREATE OR REPLACE FUNCTION rate_before_insert() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(30834, hashtext(NEW.base || NEW.quote));
    PERFORM 1 FROM rate WHERE base = NEW.base AND quote = NEW.quote FOR UPDATE;
    NEW.version := nextval('rate_version_seq');
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

-- Statement-level notifications: one NOTIFY per 40 changed rows (each row is at most ~170
-- bytes, so a payload stays well under PostgreSQL's 8000-byte limit). The payload carries
-- the whole row so instances apply it without reading the database.
-- Row: [key, version, rate text, source, as_of, updated_at]; a delete carries only [key, version].
CREATE OR REPLACE FUNCTION rate_notify_upsert() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    FOR payload IN
        SELECT '{"op":"u","rows":' || json_agg(json_build_array(
                   base || quote, version, rate::text, source, as_of, updated_at))::text || '}'
        FROM (SELECT *, row_number() OVER () - 1 AS n FROM changed_rows) r
        GROUP BY n / 40
    LOOP
        PERFORM pg_notify(xrates_channel(), payload);
    END LOOP;
    RETURN NULL;
END $$;

-- A delete's tombstone version is drawn here, while the deleted rows are still locked
-- (row locks last until commit), so it is higher than any earlier version of the key and
-- lower than that of any later re-insert (which must wait for our row lock).
CREATE OR REPLACE FUNCTION rate_notify_delete() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    FOR payload IN
        SELECT '{"op":"d","rows":' || json_agg(json_build_array(
                   base || quote, nextval('rate_version_seq')))::text || '}'
        FROM (SELECT *, row_number() OVER () - 1 AS n FROM changed_rows) r
        GROUP BY n / 40
    LOOP
        PERFORM pg_notify(xrates_channel(), payload);
    END LOOP;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION rate_notify_truncate() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(xrates_channel(), '{"op":"flush"}');
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER rate_before_insert BEFORE INSERT ON rate
    FOR EACH ROW EXECUTE FUNCTION rate_before_insert();
CREATE OR REPLACE TRIGGER rate_before_update BEFORE UPDATE ON rate
    FOR EACH ROW EXECUTE FUNCTION rate_before_update();
CREATE OR REPLACE TRIGGER rate_notify_insert AFTER INSERT ON rate
    REFERENCING NEW TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rate_notify_upsert();
CREATE OR REPLACE TRIGGER rate_notify_update AFTER UPDATE ON rate
    REFERENCING NEW TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rate_notify_upsert();
CREATE OR REPLACE TRIGGER rate_notify_delete AFTER DELETE ON rate
    REFERENCING OLD TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rate_notify_delete();
CREATE OR REPLACE TRIGGER rate_notify_truncate AFTER TRUNCATE ON rate
    FOR EACH STATEMENT EXECUTE FUNCTION rate_notify_truncate();

-- Delete one rate and return its tombstone's version (NULL if there was no such rate), so
-- the deleting instance can put the exact tombstone in its own cache at once.
CREATE OR REPLACE FUNCTION rate_delete(p_base text, p_quote text) RETURNS bigint
    LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM rate WHERE base = p_base AND quote = p_quote;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN currval('rate_version_seq');  -- drawn by rate_notify_delete for this statement
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
