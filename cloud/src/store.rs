//! The store: one trait ([`Store`]) in front of the database, with versioned
//! migrations, and one implementation of it ([`SqlStore`]) for both backends: SQLite
//! (the default, one process) and PostgreSQL (several replicas on one database).
//!
//! Both run the same SQL text through sqlx's `Any` driver, so the backends cannot drift:
//! timestamps are integer unix seconds, structured values are JSON in TEXT columns,
//! hashes and keys are lowercase hex TEXT, every query uses `$N` placeholders (which
//! SQLite accepts too) and upserts are `ON CONFLICT` (both speak it). The one spelling
//! that differs is the auto-increment key: migrations write `INTEGER PRIMARY KEY`
//! (SQLite's rowid alias) and [`Backend::dialect`] rewrites it to an identity column
//! for PostgreSQL when the migration is applied.
//!
//! What it is not: a cache. Every replica reads and writes the database itself.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyPool, ConnectOptions, Connection, Row};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error(
        "database {url}: unsupported URL scheme; use sqlite://PATH or postgres://USER@HOST/DB"
    )]
    Scheme { url: String },
    #[error("migration {version} ({name}): {source}")]
    Migration {
        version: i64,
        name: &'static str,
        source: sqlx::Error,
    },
    #[error("database schema version {found} is newer than this chute-cloud knows ({known}); upgrade chute-cloud")]
    SchemaTooNew { found: i64, known: i64 },
    #[error("database query ({what}): {source}")]
    Query {
        what: &'static str,
        source: sqlx::Error,
    },
}

type Res<T> = Result<T, StoreError>;
pub type Fut<'a, T> = Pin<Box<dyn Future<Output = Res<T>> + Send + 'a>>;

/// Versioned migrations, applied in order, each once, inside a transaction. Append
/// only: a released migration is never edited.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "initial schema",
    r#"
CREATE TABLE owners (
    id INTEGER PRIMARY KEY,
    pubkey TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
CREATE TABLE api_tokens (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    pubkey TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',
    agent_version TEXT,
    first_seen BIGINT,
    last_seen BIGINT,
    last_heartbeat BIGINT,
    heartbeat TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX devices_status ON devices (status);
CREATE TABLE claim_tokens (
    token_sha256 TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    used_by TEXT
);
CREATE TABLE grants (
    id INTEGER PRIMARY KEY,
    developer TEXT NOT NULL,
    signed TEXT NOT NULL UNIQUE,
    summary TEXT NOT NULL,
    issued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX grants_developer ON grants (developer);
CREATE TABLE deployments (
    id INTEGER PRIMARY KEY,
    chute TEXT NOT NULL,
    version TEXT NOT NULL,
    image_sha256 TEXT,
    targets TEXT NOT NULL,
    strategy TEXT NOT NULL DEFAULT '{"kind":"all-at-once"}',
    created_at BIGINT NOT NULL
);
CREATE TABLE commands (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    deployment_id BIGINT,
    signer TEXT NOT NULL,
    request_id BIGINT NOT NULL,
    procedure TEXT NOT NULL,
    chute TEXT,
    status TEXT NOT NULL,
    reason TEXT,
    signed TEXT NOT NULL,
    result TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX commands_device_status ON commands (device_id, status, id);
CREATE INDEX commands_deployment ON commands (deployment_id);
CREATE TABLE command_events (
    id INTEGER PRIMARY KEY,
    command_id BIGINT NOT NULL,
    status TEXT NOT NULL,
    at BIGINT NOT NULL,
    detail TEXT
);
CREATE INDEX command_events_command ON command_events (command_id, id);
CREATE TABLE blobs (
    sha256 TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    received BIGINT NOT NULL,
    complete BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY,
    at BIGINT NOT NULL,
    token_id BIGINT,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status BIGINT NOT NULL
);
"#,
)];

#[derive(Debug, Clone)]
pub struct TokenRow {
    pub id: i64,
    pub name: String,
    pub role: String,
}

#[derive(Debug, Clone)]
pub struct DeviceRow {
    pub id: String,
    pub pubkey: String,
    pub status: String,
    pub tags: String,
    pub agent_version: Option<String>,
    pub first_seen: Option<i64>,
    pub last_seen: Option<i64>,
    pub last_heartbeat: Option<i64>,
    pub heartbeat: Option<String>,
}

/// One heartbeat to record.
#[derive(Debug, Clone)]
pub struct HeartbeatRow {
    pub device: String,
    pub agent_version: String,
    pub json: String,
    pub at: i64,
}

#[derive(Debug, Clone)]
pub struct GrantRow {
    pub id: i64,
    pub developer: String,
    pub signed: String,
    pub summary: String,
    pub issued_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct CommandRow {
    pub id: i64,
    pub device_id: String,
    pub deployment_id: Option<i64>,
    pub signer: String,
    pub request_id: i64,
    pub procedure: String,
    pub chute: Option<String>,
    pub status: String,
    pub reason: Option<String>,
    pub signed: String,
    pub result: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub updated_at: i64,
}

/// A command to store (its id is assigned by the store).
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub device_id: String,
    pub deployment_id: Option<i64>,
    pub signer: String,
    pub request_id: i64,
    pub procedure: String,
    pub chute: Option<String>,
    pub status: String,
    pub reason: Option<String>,
    pub signed: String,
    pub created_at: i64,
    pub expires_at: i64,
}

#[derive(Debug, Clone)]
pub struct EventRow {
    pub status: String,
    pub at: i64,
    pub detail: Option<String>,
}

#[derive(Debug, Clone)]
pub struct BlobRow {
    pub sha256: String,
    pub size: i64,
    pub received: i64,
    pub complete: bool,
}

#[derive(Debug, Clone)]
pub struct DeploymentRow {
    pub id: i64,
    pub chute: String,
    pub version: String,
    pub image_sha256: Option<String>,
    pub targets: String,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct AuditRow {
    pub id: i64,
    pub at: i64,
    pub token_id: Option<i64>,
    pub method: String,
    pub path: String,
    pub status: i64,
}

/// Everything chute-cloud keeps. Methods return boxed futures so the API holds an
/// `Arc<dyn Store>` and a second backend is one more `impl`.
pub trait Store: Send + Sync {
    fn token_insert<'a>(
        &'a self,
        name: &'a str,
        sha: &'a str,
        role: &'a str,
        now: i64,
    ) -> Fut<'a, i64>;
    fn token_lookup<'a>(&'a self, sha: &'a str) -> Fut<'a, Option<TokenRow>>;
    fn token_count(&self) -> Fut<'_, i64>;
    fn token_list(&self) -> Fut<'_, Vec<TokenRow>>;
    fn audit<'a>(
        &'a self,
        at: i64,
        token_id: Option<i64>,
        method: &'a str,
        path: &'a str,
        status: i64,
    ) -> Fut<'a, ()>;
    fn audit_list(&self, limit: i64) -> Fut<'_, Vec<AuditRow>>;

    fn owner_get(&self) -> Fut<'_, Option<String>>;
    fn owner_set<'a>(&'a self, pubkey: &'a str, now: i64) -> Fut<'a, ()>;

    fn device_get<'a>(&'a self, id: &'a str) -> Fut<'a, Option<DeviceRow>>;
    fn device_insert<'a>(
        &'a self,
        id: &'a str,
        pubkey: &'a str,
        status: &'a str,
        now: i64,
    ) -> Fut<'a, ()>;
    fn device_set_status<'a>(&'a self, id: &'a str, status: &'a str, now: i64) -> Fut<'a, bool>;
    fn device_set_tags<'a>(&'a self, id: &'a str, tags_json: &'a str, now: i64) -> Fut<'a, bool>;
    fn device_list(&self) -> Fut<'_, Vec<DeviceRow>>;
    fn device_count_status<'a>(&'a self, status: &'a str) -> Fut<'a, i64>;
    fn device_seen<'a>(&'a self, id: &'a str, agent_version: &'a str, now: i64) -> Fut<'a, ()>;
    /// Records heartbeats of several devices in one transaction (one commit, one sync
    /// to disk, for however many arrived meanwhile).
    fn device_heartbeats<'a>(&'a self, beats: &'a [HeartbeatRow]) -> Fut<'a, ()>;

    /// Replaces the stored status snapshot without claiming a heartbeat arrived.
    fn device_set_snapshot<'a>(&'a self, id: &'a str, heartbeat_json: &'a str) -> Fut<'a, ()>;
    fn claim_insert<'a>(&'a self, sha: &'a str, now: i64, expires_at: i64) -> Fut<'a, ()>;
    /// Marks an unused, unexpired claim token used by `device`; false if it was not.
    fn claim_use<'a>(&'a self, sha: &'a str, device: &'a str, now: i64) -> Fut<'a, bool>;

    fn grant_insert<'a>(&'a self, g: &'a GrantRow, now: i64) -> Fut<'a, i64>;
    fn grant_list(&self) -> Fut<'_, Vec<GrantRow>>;
    fn grant_revoke(&self, id: i64, now: i64) -> Fut<'_, bool>;
    fn grant_revoked<'a>(&'a self, signed: &'a str) -> Fut<'a, bool>;

    fn command_insert<'a>(&'a self, c: &'a NewCommand) -> Fut<'a, i64>;
    fn command_get(&self, id: i64) -> Fut<'_, Option<CommandRow>>;
    fn command_list<'a>(
        &'a self,
        device: Option<&'a str>,
        deployment: Option<i64>,
        limit: i64,
    ) -> Fut<'a, Vec<CommandRow>>;
    /// The oldest `queued` or `sent` command of a device (delivery is in id order).
    fn command_next<'a>(&'a self, device: &'a str) -> Fut<'a, Option<CommandRow>>;
    /// Moves a command to `status` and appends it to the timeline.
    fn command_set<'a>(
        &'a self,
        id: i64,
        status: &'a str,
        reason: Option<&'a str>,
        result: Option<&'a str>,
        now: i64,
    ) -> Fut<'a, ()>;
    fn command_events(&self, id: i64) -> Fut<'_, Vec<EventRow>>;
    fn command_counts(&self) -> Fut<'_, Vec<(String, i64)>>;

    fn blob_get<'a>(&'a self, sha: &'a str) -> Fut<'a, Option<BlobRow>>;
    fn blob_put<'a>(&'a self, b: &'a BlobRow, now: i64) -> Fut<'a, ()>;

    fn deployment_insert<'a>(&'a self, d: &'a DeploymentRow) -> Fut<'a, i64>;
    fn deployment_get(&self, id: i64) -> Fut<'_, Option<DeploymentRow>>;
    fn deployment_list(&self, limit: i64) -> Fut<'_, Vec<DeploymentRow>>;
}

/// Which database a [`SqlStore`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend of a database URL (`sqlite:`, `postgres:` or `postgresql:`).
    pub fn of_url(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::Scheme { url: redact(url) })
        }
    }

    /// A migration's SQL as this backend spells it. The only difference is the
    /// auto-increment key: SQLite's `INTEGER PRIMARY KEY` is a 64-bit rowid alias;
    /// PostgreSQL's `INTEGER` is 32-bit and never auto-increments, so it becomes a
    /// 64-bit identity column (BY DEFAULT, so restores can insert explicit ids).
    pub fn dialect(self, sql: &str) -> String {
        match self {
            Backend::Sqlite => sql.to_owned(),
            Backend::Postgres => sql.replace(
                "INTEGER PRIMARY KEY",
                "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
            ),
        }
    }
}

/// A database URL without its password, for errors and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &userinfo[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// The store on SQLite or PostgreSQL (one implementation, one SQL text).
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
}

fn q(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

/// Connections per process. SQLite has one writer anyway; PostgreSQL connections
/// cost the server ~10 MB each, and replicas multiply them.
const POOL_SQLITE: u32 = 4;
const POOL_POSTGRES: u32 = 8;

/// Key of the PostgreSQL advisory lock that serialises migrations of replicas starting
/// at once ("chute" in ASCII).
const MIGRATION_LOCK: i64 = 0x0063_6875_7465;

impl SqlStore {
    /// Opens the database at `url` (SQLite: creating the file if missing) and applies
    /// pending migrations.
    pub async fn open(url: &str) -> Res<Self> {
        let open = |source| StoreError::Open {
            url: redact(url),
            source,
        };
        let backend = Backend::of_url(url)?;
        sqlx::any::install_default_drivers();
        if backend == Backend::Sqlite {
            // The Any driver takes options from the URL only: create the file and
            // switch it to WAL (a property of the file) with the SQLite options first.
            // The pool's connections get sqlx's defaults: foreign keys on, 5 s busy
            // timeout.
            let mut c = SqliteConnectOptions::from_str(url)
                .map_err(open)?
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .connect()
                .await
                .map_err(open)?;
            c.ping().await.map_err(open)?;
            c.close().await.map_err(open)?;
        }
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => POOL_SQLITE,
                Backend::Postgres => POOL_POSTGRES,
            })
            .connect(url)
            .await
            .map_err(open)?;
        let store = SqlStore { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Res<()> {
        let mut conn = self.pool.acquire().await.map_err(q("migrate"))?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *conn)
                .await
                .map_err(q("lock migrations"))?;
        }
        let r = self.migrate_on(&mut conn).await;
        if self.backend == Backend::Postgres {
            // A connection that cannot unlock is closed, which unlocks too.
            if sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *conn)
                .await
                .is_err()
            {
                let _ = conn.detach().close().await;
            }
        }
        r
    }

    async fn migrate_on(&self, conn: &mut sqlx::AnyConnection) -> Res<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *conn)
        .await
        .map_err(q("create schema_migrations"))?;
        let current: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(&mut *conn)
            .await
            .map_err(q("read schema version"))?
            .try_get(0)
            .map_err(q("read schema version"))?;
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        if current > known {
            return Err(StoreError::SchemaTooNew {
                found: current,
                known,
            });
        }
        for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            let err = |source| StoreError::Migration {
                version: *version,
                name,
                source,
            };
            let mut tx = conn.begin().await.map_err(err)?;
            // The version row first: it takes the write lock, so a second process
            // migrating at the same moment waits here and then finds the row taken.
            let claimed = sqlx::query(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3) ON CONFLICT (version) DO NOTHING",
            )
            .bind(version)
            .bind(*name)
            .bind(crate::now())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
            if claimed.rows_affected() == 0 {
                tx.rollback().await.map_err(err)?;
                continue;
            }
            sqlx::raw_sql(&self.backend.dialect(sql))
                .execute(&mut *tx)
                .await
                .map_err(err)?;
            tx.commit().await.map_err(err)?;
            tracing::info!(version, name, "applied migration");
        }
        Ok(())
    }
}

fn device_row(r: &AnyRow) -> Result<DeviceRow, sqlx::Error> {
    Ok(DeviceRow {
        id: r.try_get("id")?,
        pubkey: r.try_get("pubkey")?,
        status: r.try_get("status")?,
        tags: r.try_get("tags")?,
        agent_version: r.try_get("agent_version")?,
        first_seen: r.try_get("first_seen")?,
        last_seen: r.try_get("last_seen")?,
        last_heartbeat: r.try_get("last_heartbeat")?,
        heartbeat: r.try_get("heartbeat")?,
    })
}

fn grant_row(r: &AnyRow) -> Result<GrantRow, sqlx::Error> {
    Ok(GrantRow {
        id: r.try_get("id")?,
        developer: r.try_get("developer")?,
        signed: r.try_get("signed")?,
        summary: r.try_get("summary")?,
        issued_at: r.try_get("issued_at")?,
        expires_at: r.try_get("expires_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

fn command_row(r: &AnyRow) -> Result<CommandRow, sqlx::Error> {
    Ok(CommandRow {
        id: r.try_get("id")?,
        device_id: r.try_get("device_id")?,
        deployment_id: r.try_get("deployment_id")?,
        signer: r.try_get("signer")?,
        request_id: r.try_get("request_id")?,
        procedure: r.try_get("procedure")?,
        chute: r.try_get("chute")?,
        status: r.try_get("status")?,
        reason: r.try_get("reason")?,
        signed: r.try_get("signed")?,
        result: r.try_get("result")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn deployment_row(r: &AnyRow) -> Result<DeploymentRow, sqlx::Error> {
    Ok(DeploymentRow {
        id: r.try_get("id")?,
        chute: r.try_get("chute")?,
        version: r.try_get("version")?,
        image_sha256: r.try_get("image_sha256")?,
        targets: r.try_get("targets")?,
        created_at: r.try_get("created_at")?,
    })
}

fn rows<T>(
    rs: Vec<AnyRow>,
    f: fn(&AnyRow) -> Result<T, sqlx::Error>,
    what: &'static str,
) -> Res<Vec<T>> {
    rs.iter().map(f).collect::<Result<_, _>>().map_err(q(what))
}

const COMMAND_COLS: &str = "id, device_id, deployment_id, signer, request_id, procedure, chute, status, reason, signed, result, created_at, expires_at, updated_at";

impl Store for SqlStore {
    fn token_insert<'a>(
        &'a self,
        name: &'a str,
        sha: &'a str,
        role: &'a str,
        now: i64,
    ) -> Fut<'a, i64> {
        Box::pin(async move {
            let r = sqlx::query("INSERT INTO api_tokens (name, token_sha256, role, created_at) VALUES ($1, $2, $3, $4) RETURNING id")
                .bind(name).bind(sha).bind(role).bind(now)
                .fetch_one(&self.pool).await.map_err(q("insert token"))?;
            r.try_get(0).map_err(q("insert token"))
        })
    }

    fn token_lookup<'a>(&'a self, sha: &'a str) -> Fut<'a, Option<TokenRow>> {
        Box::pin(async move {
            let r = sqlx::query("SELECT id, name, role FROM api_tokens WHERE token_sha256 = $1 AND revoked_at IS NULL")
                .bind(sha).fetch_optional(&self.pool).await.map_err(q("look up token"))?;
            r.map(|r| -> Result<_, sqlx::Error> {
                Ok(TokenRow {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    role: r.try_get("role")?,
                })
            })
            .transpose()
            .map_err(q("look up token"))
        })
    }

    fn token_list(&self) -> Fut<'_, Vec<TokenRow>> {
        Box::pin(async move {
            let rs = sqlx::query(
                "SELECT id, name, role FROM api_tokens WHERE revoked_at IS NULL ORDER BY id",
            )
            .fetch_all(&self.pool)
            .await
            .map_err(q("list tokens"))?;
            rows(
                rs,
                |r| {
                    Ok(TokenRow {
                        id: r.try_get("id")?,
                        name: r.try_get("name")?,
                        role: r.try_get("role")?,
                    })
                },
                "list tokens",
            )
        })
    }

    fn token_count(&self) -> Fut<'_, i64> {
        Box::pin(async move {
            sqlx::query("SELECT COUNT(*) FROM api_tokens")
                .fetch_one(&self.pool)
                .await
                .and_then(|r| r.try_get(0))
                .map_err(q("count tokens"))
        })
    }

    fn audit<'a>(
        &'a self,
        at: i64,
        token_id: Option<i64>,
        method: &'a str,
        path: &'a str,
        status: i64,
    ) -> Fut<'a, ()> {
        Box::pin(async move {
            sqlx::query("INSERT INTO audit_log (at, token_id, method, path, status) VALUES ($1, $2, $3, $4, $5)")
                .bind(at).bind(token_id).bind(method).bind(path).bind(status)
                .execute(&self.pool).await.map_err(q("write audit log"))?;
            Ok(())
        })
    }

    fn audit_list(&self, limit: i64) -> Fut<'_, Vec<AuditRow>> {
        Box::pin(async move {
            let rs = sqlx::query("SELECT id, at, token_id, method, path, status FROM audit_log ORDER BY id DESC LIMIT $1")
                .bind(limit).fetch_all(&self.pool).await.map_err(q("read audit log"))?;
            rows(
                rs,
                |r| {
                    Ok(AuditRow {
                        id: r.try_get("id")?,
                        at: r.try_get("at")?,
                        token_id: r.try_get("token_id")?,
                        method: r.try_get("method")?,
                        path: r.try_get("path")?,
                        status: r.try_get("status")?,
                    })
                },
                "read audit log",
            )
        })
    }

    fn owner_get(&self) -> Fut<'_, Option<String>> {
        Box::pin(async move {
            let r = sqlx::query("SELECT pubkey FROM owners ORDER BY id LIMIT 1")
                .fetch_optional(&self.pool)
                .await
                .map_err(q("read owner"))?;
            r.map(|r| r.try_get(0)).transpose().map_err(q("read owner"))
        })
    }

    fn owner_set<'a>(&'a self, pubkey: &'a str, now: i64) -> Fut<'a, ()> {
        Box::pin(async move {
            sqlx::query("INSERT INTO owners (pubkey, created_at) VALUES ($1, $2) ON CONFLICT (pubkey) DO NOTHING")
                .bind(pubkey).bind(now).execute(&self.pool).await.map_err(q("set owner"))?;
            Ok(())
        })
    }

    fn device_get<'a>(&'a self, id: &'a str) -> Fut<'a, Option<DeviceRow>> {
        Box::pin(async move {
            let r = sqlx::query("SELECT * FROM devices WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(q("read device"))?;
            r.as_ref()
                .map(device_row)
                .transpose()
                .map_err(q("read device"))
        })
    }

    fn device_insert<'a>(
        &'a self,
        id: &'a str,
        pubkey: &'a str,
        status: &'a str,
        now: i64,
    ) -> Fut<'a, ()> {
        Box::pin(async move {
            sqlx::query("INSERT INTO devices (id, pubkey, status, created_at, updated_at) VALUES ($1, $2, $3, $4, $4) ON CONFLICT (id) DO NOTHING")
                .bind(id).bind(pubkey).bind(status).bind(now)
                .execute(&self.pool).await.map_err(q("insert device"))?;
            Ok(())
        })
    }

    fn device_set_status<'a>(&'a self, id: &'a str, status: &'a str, now: i64) -> Fut<'a, bool> {
        Box::pin(async move {
            let r = sqlx::query("UPDATE devices SET status = $2, updated_at = $3 WHERE id = $1")
                .bind(id)
                .bind(status)
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(q("set device status"))?;
            Ok(r.rows_affected() == 1)
        })
    }

    fn device_set_tags<'a>(&'a self, id: &'a str, tags_json: &'a str, now: i64) -> Fut<'a, bool> {
        Box::pin(async move {
            let r = sqlx::query("UPDATE devices SET tags = $2, updated_at = $3 WHERE id = $1")
                .bind(id)
                .bind(tags_json)
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(q("set device tags"))?;
            Ok(r.rows_affected() == 1)
        })
    }

    fn device_list(&self) -> Fut<'_, Vec<DeviceRow>> {
        Box::pin(async move {
            let rs = sqlx::query("SELECT * FROM devices ORDER BY created_at, id")
                .fetch_all(&self.pool)
                .await
                .map_err(q("list devices"))?;
            rows(rs, device_row, "list devices")
        })
    }

    fn device_count_status<'a>(&'a self, status: &'a str) -> Fut<'a, i64> {
        Box::pin(async move {
            sqlx::query("SELECT COUNT(*) FROM devices WHERE status = $1")
                .bind(status)
                .fetch_one(&self.pool)
                .await
                .and_then(|r| r.try_get(0))
                .map_err(q("count devices"))
        })
    }

    fn device_seen<'a>(&'a self, id: &'a str, agent_version: &'a str, now: i64) -> Fut<'a, ()> {
        Box::pin(async move {
            sqlx::query("UPDATE devices SET agent_version = $2, last_seen = $3, first_seen = COALESCE(first_seen, $3) WHERE id = $1")
                .bind(id).bind(agent_version).bind(now).execute(&self.pool).await.map_err(q("record device session"))?;
            Ok(())
        })
    }

    fn device_heartbeats<'a>(&'a self, beats: &'a [HeartbeatRow]) -> Fut<'a, ()> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(q("record heartbeats"))?;
            for b in beats {
                sqlx::query("UPDATE devices SET agent_version = $2, heartbeat = $3, last_heartbeat = $4, last_seen = $4 WHERE id = $1")
                    .bind(&b.device).bind(&b.agent_version).bind(&b.json).bind(b.at)
                    .execute(&mut *tx).await.map_err(q("record heartbeat"))?;
            }
            tx.commit().await.map_err(q("record heartbeats"))?;
            Ok(())
        })
    }

    fn device_set_snapshot<'a>(&'a self, id: &'a str, heartbeat_json: &'a str) -> Fut<'a, ()> {
        Box::pin(async move {
            sqlx::query("UPDATE devices SET heartbeat = $2 WHERE id = $1")
                .bind(id)
                .bind(heartbeat_json)
                .execute(&self.pool)
                .await
                .map_err(q("update device status"))?;
            Ok(())
        })
    }

    fn claim_insert<'a>(&'a self, sha: &'a str, now: i64, expires_at: i64) -> Fut<'a, ()> {
        Box::pin(async move {
            sqlx::query("INSERT INTO claim_tokens (token_sha256, created_at, expires_at) VALUES ($1, $2, $3)")
                .bind(sha).bind(now).bind(expires_at).execute(&self.pool).await.map_err(q("insert claim token"))?;
            Ok(())
        })
    }

    fn claim_use<'a>(&'a self, sha: &'a str, device: &'a str, now: i64) -> Fut<'a, bool> {
        Box::pin(async move {
            let r = sqlx::query("UPDATE claim_tokens SET used_at = $3, used_by = $2 WHERE token_sha256 = $1 AND used_at IS NULL AND expires_at > $3")
                .bind(sha).bind(device).bind(now).execute(&self.pool).await.map_err(q("use claim token"))?;
            Ok(r.rows_affected() == 1)
        })
    }

    fn grant_insert<'a>(&'a self, g: &'a GrantRow, now: i64) -> Fut<'a, i64> {
        Box::pin(async move {
            let r = sqlx::query("INSERT INTO grants (developer, signed, summary, issued_at, expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (signed) DO UPDATE SET summary = excluded.summary RETURNING id")
                .bind(&g.developer).bind(&g.signed).bind(&g.summary).bind(g.issued_at).bind(g.expires_at).bind(now)
                .fetch_one(&self.pool).await.map_err(q("insert grant"))?;
            r.try_get(0).map_err(q("insert grant"))
        })
    }

    fn grant_list(&self) -> Fut<'_, Vec<GrantRow>> {
        Box::pin(async move {
            let rs = sqlx::query("SELECT * FROM grants ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .map_err(q("list grants"))?;
            rows(rs, grant_row, "list grants")
        })
    }

    fn grant_revoke(&self, id: i64, now: i64) -> Fut<'_, bool> {
        Box::pin(async move {
            let r = sqlx::query(
                "UPDATE grants SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1",
            )
            .bind(id)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(q("revoke grant"))?;
            Ok(r.rows_affected() == 1)
        })
    }

    fn grant_revoked<'a>(&'a self, signed: &'a str) -> Fut<'a, bool> {
        Box::pin(async move {
            let r =
                sqlx::query("SELECT 1 FROM grants WHERE signed = $1 AND revoked_at IS NOT NULL")
                    .bind(signed)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(q("check grant"))?;
            Ok(r.is_some())
        })
    }

    fn command_insert<'a>(&'a self, c: &'a NewCommand) -> Fut<'a, i64> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(q("insert command"))?;
            let id: i64 = sqlx::query("INSERT INTO commands (device_id, deployment_id, signer, request_id, procedure, chute, status, reason, signed, created_at, expires_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $10) RETURNING id")
                .bind(&c.device_id).bind(c.deployment_id).bind(&c.signer).bind(c.request_id).bind(&c.procedure)
                .bind(&c.chute).bind(&c.status).bind(&c.reason).bind(&c.signed).bind(c.created_at).bind(c.expires_at)
                .fetch_one(&mut *tx).await.and_then(|r| r.try_get(0)).map_err(q("insert command"))?;
            sqlx::query("INSERT INTO command_events (command_id, status, at, detail) VALUES ($1, $2, $3, $4)")
                .bind(id).bind(&c.status).bind(c.created_at).bind(&c.reason)
                .execute(&mut *tx).await.map_err(q("insert command event"))?;
            tx.commit().await.map_err(q("insert command"))?;
            Ok(id)
        })
    }

    fn command_get(&self, id: i64) -> Fut<'_, Option<CommandRow>> {
        Box::pin(async move {
            let r = sqlx::query(&format!(
                "SELECT {COMMAND_COLS} FROM commands WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("read command"))?;
            r.as_ref()
                .map(command_row)
                .transpose()
                .map_err(q("read command"))
        })
    }

    fn command_list<'a>(
        &'a self,
        device: Option<&'a str>,
        deployment: Option<i64>,
        limit: i64,
    ) -> Fut<'a, Vec<CommandRow>> {
        Box::pin(async move {
            let rs = sqlx::query(&format!(
                "SELECT {COMMAND_COLS} FROM commands WHERE ($1 IS NULL OR device_id = $1) AND ($2 IS NULL OR deployment_id = $2) ORDER BY id DESC LIMIT $3"))
                .bind(device).bind(deployment).bind(limit)
                .fetch_all(&self.pool).await.map_err(q("list commands"))?;
            rows(rs, command_row, "list commands")
        })
    }

    fn command_next<'a>(&'a self, device: &'a str) -> Fut<'a, Option<CommandRow>> {
        Box::pin(async move {
            let r = sqlx::query(&format!(
                "SELECT {COMMAND_COLS} FROM commands WHERE device_id = $1 AND status IN ('queued', 'sent') ORDER BY id LIMIT 1"))
                .bind(device).fetch_optional(&self.pool).await.map_err(q("next command"))?;
            r.as_ref()
                .map(command_row)
                .transpose()
                .map_err(q("next command"))
        })
    }

    fn command_set<'a>(
        &'a self,
        id: i64,
        status: &'a str,
        reason: Option<&'a str>,
        result: Option<&'a str>,
        now: i64,
    ) -> Fut<'a, ()> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(q("update command"))?;
            sqlx::query("UPDATE commands SET status = $2, reason = COALESCE($3, reason), result = COALESCE($4, result), updated_at = $5 WHERE id = $1")
                .bind(id).bind(status).bind(reason).bind(result).bind(now)
                .execute(&mut *tx).await.map_err(q("update command"))?;
            sqlx::query("INSERT INTO command_events (command_id, status, at, detail) VALUES ($1, $2, $3, $4)")
                .bind(id).bind(status).bind(now).bind(reason)
                .execute(&mut *tx).await.map_err(q("insert command event"))?;
            tx.commit().await.map_err(q("update command"))?;
            Ok(())
        })
    }

    fn command_events(&self, id: i64) -> Fut<'_, Vec<EventRow>> {
        Box::pin(async move {
            let rs = sqlx::query(
                "SELECT status, at, detail FROM command_events WHERE command_id = $1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(q("read command timeline"))?;
            rows(
                rs,
                |r| {
                    Ok(EventRow {
                        status: r.try_get("status")?,
                        at: r.try_get("at")?,
                        detail: r.try_get("detail")?,
                    })
                },
                "read command timeline",
            )
        })
    }

    fn command_counts(&self) -> Fut<'_, Vec<(String, i64)>> {
        Box::pin(async move {
            let rs = sqlx::query(
                "SELECT status, COUNT(*) AS n FROM commands GROUP BY status ORDER BY status",
            )
            .fetch_all(&self.pool)
            .await
            .map_err(q("count commands"))?;
            rows(
                rs,
                |r| Ok((r.try_get("status")?, r.try_get("n")?)),
                "count commands",
            )
        })
    }

    fn blob_get<'a>(&'a self, sha: &'a str) -> Fut<'a, Option<BlobRow>> {
        Box::pin(async move {
            let r =
                sqlx::query("SELECT sha256, size, received, complete FROM blobs WHERE sha256 = $1")
                    .bind(sha)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(q("read blob"))?;
            r.map(|r| -> Result<_, sqlx::Error> {
                Ok(BlobRow {
                    sha256: r.try_get("sha256")?,
                    size: r.try_get("size")?,
                    received: r.try_get("received")?,
                    complete: r.try_get::<i64, _>("complete")? != 0,
                })
            })
            .transpose()
            .map_err(q("read blob"))
        })
    }

    fn blob_put<'a>(&'a self, b: &'a BlobRow, now: i64) -> Fut<'a, ()> {
        Box::pin(async move {
            sqlx::query("INSERT INTO blobs (sha256, size, received, complete, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (sha256) DO UPDATE SET received = excluded.received, complete = excluded.complete")
                .bind(&b.sha256).bind(b.size).bind(b.received).bind(i64::from(b.complete)).bind(now)
                .execute(&self.pool).await.map_err(q("write blob"))?;
            Ok(())
        })
    }

    fn deployment_insert<'a>(&'a self, d: &'a DeploymentRow) -> Fut<'a, i64> {
        Box::pin(async move {
            sqlx::query("INSERT INTO deployments (chute, version, image_sha256, targets, created_at) VALUES ($1, $2, $3, $4, $5) RETURNING id")
                .bind(&d.chute).bind(&d.version).bind(&d.image_sha256).bind(&d.targets).bind(d.created_at)
                .fetch_one(&self.pool).await.and_then(|r| r.try_get(0)).map_err(q("insert deployment"))
        })
    }

    fn deployment_get(&self, id: i64) -> Fut<'_, Option<DeploymentRow>> {
        Box::pin(async move {
            let r = sqlx::query("SELECT * FROM deployments WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(q("read deployment"))?;
            r.as_ref()
                .map(deployment_row)
                .transpose()
                .map_err(q("read deployment"))
        })
    }

    fn deployment_list(&self, limit: i64) -> Fut<'_, Vec<DeploymentRow>> {
        Box::pin(async move {
            let rs = sqlx::query("SELECT * FROM deployments ORDER BY id DESC LIMIT $1")
                .bind(limit)
                .fetch_all(&self.pool)
                .await
                .map_err(q("list deployments"))?;
            rows(rs, deployment_row, "list deployments")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_spells_the_key_as_a_64_bit_identity_and_nothing_else_differs() {
        let pg = Backend::Postgres.dialect(MIGRATIONS[0].2);
        assert!(!pg.contains("INTEGER PRIMARY KEY"));
        assert_eq!(
            pg.matches("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
                .count(),
            MIGRATIONS[0].2.matches("INTEGER PRIMARY KEY").count()
        );
        assert_eq!(Backend::Sqlite.dialect(MIGRATIONS[0].2), MIGRATIONS[0].2);
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert!(matches!(
            Backend::of_url("mysql://x"),
            Err(StoreError::Scheme { .. })
        ));
    }

    #[tokio::test]
    async fn sqlite_migrations_apply_once_and_commands_keep_a_timeline() {
        let dir = std::env::temp_dir().join(format!("chute-cloud-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        exercise(&format!("sqlite://{}/t.db", dir.display())).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn postgres_migrations_apply_once_and_commands_keep_a_timeline() {
        let pg = e2e::pg::PgCluster::start();
        exercise(&pg.database("store")).await;
    }

    /// The same calls on either backend.
    async fn exercise(url: &str) {
        // Two opens at once (replicas starting together) migrate once.
        let (a, b) = tokio::join!(SqlStore::open(url), SqlStore::open(url));
        a.expect("open");
        b.expect("open concurrently");
        let s = SqlStore::open(url)
            .await
            .expect("reopen applies nothing twice");
        s.device_insert("00", "ab", "accepted", 1)
            .await
            .expect("device");
        s.device_insert("00", "ab", "pending", 1)
            .await
            .expect("a second insert is ignored");
        assert_eq!(s.device_count_status("accepted").await.expect("count"), 1);
        let beat = |json: &str, at| HeartbeatRow {
            device: "00".into(),
            agent_version: "v".into(),
            json: json.into(),
            at,
        };
        s.device_heartbeats(&[beat("{\"seq\":1}", 5), beat("{\"seq\":2}", 6)])
            .await
            .expect("heartbeats");
        let d = s.device_get("00").await.expect("device").expect("stored");
        assert_eq!(
            (d.heartbeat.as_deref(), d.last_heartbeat),
            (Some("{\"seq\":2}"), Some(6))
        );
        let tid = s.token_insert("t", "sha", "admin", 1).await.expect("token");
        s.audit(2, Some(tid), "GET", "/x", 200)
            .await
            .expect("audit");
        s.audit(3, None, "GET", "/y", 401).await.expect("audit");
        let audit = s.audit_list(10).await.expect("audit list");
        assert_eq!(audit.len(), 2);
        assert_eq!(audit[1].token_id, Some(tid));
        assert_eq!(audit[0].token_id, None);
        s.blob_put(
            &BlobRow {
                sha256: "aa".into(),
                size: 5_000_000_000,
                received: 1,
                complete: false,
            },
            1,
        )
        .await
        .expect("blob");
        s.blob_put(
            &BlobRow {
                sha256: "aa".into(),
                size: 5_000_000_000,
                received: 5_000_000_000,
                complete: true,
            },
            1,
        )
        .await
        .expect("blob upsert");
        let blob = s.blob_get("aa").await.expect("blob").expect("stored");
        assert!(blob.complete);
        assert_eq!(blob.received, 5_000_000_000);
        let id = s
            .command_insert(&NewCommand {
                device_id: "00".into(),
                deployment_id: None,
                signer: "k".into(),
                request_id: 7,
                procedure: "start".into(),
                chute: Some("c".into()),
                status: "queued".into(),
                reason: None,
                signed: "ff".into(),
                created_at: 1,
                expires_at: 100,
            })
            .await
            .expect("insert");
        assert_eq!(
            s.command_next("00").await.expect("next").map(|c| c.id),
            Some(id)
        );
        assert_eq!(
            s.command_list(Some("00"), None, 10)
                .await
                .expect("list")
                .len(),
            1
        );
        assert_eq!(
            s.command_list(None, Some(3), 10).await.expect("list").len(),
            0
        );
        s.command_set(id, "sent", None, None, 2)
            .await
            .expect("sent");
        s.command_set(id, "succeeded", None, Some("aa"), 3)
            .await
            .expect("done");
        assert!(s.command_next("00").await.expect("next").is_none());
        let t: Vec<String> = s
            .command_events(id)
            .await
            .expect("events")
            .into_iter()
            .map(|e| e.status)
            .collect();
        assert_eq!(t, ["queued", "sent", "succeeded"]);
        assert_eq!(
            s.command_counts().await.expect("counts"),
            [("succeeded".to_owned(), 1)]
        );
    }
}
