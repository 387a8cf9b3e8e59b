//! Durable storage of the tailnet: the control crate's persistence records
//! (one row per node, one per auth key), in SQLite (one file, the default)
//! or PostgreSQL (shared by replicas, which tell each other about every
//! write with `NOTIFY`).

use std::path::PathBuf;

use tokio::sync::mpsc;
use wgmesh_control::{NodeKey, StoredAuthKey, StoredNode, TailnetState};

/// The schema version this binary writes; a database with a newer one is
/// refused rather than misread.
pub const SCHEMA_VERSION: i64 = 1;

/// The `NOTIFY` channel replicas use.
pub const NOTIFY_CHANNEL: &str = "wgmesh_control";

/// One durable change, in the order control emitted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Insert or replace a node.
    Node(Box<StoredNode>),
    /// Delete a node.
    ForgetNode(NodeKey),
    /// Insert or replace an auth key.
    AuthKey(Box<StoredAuthKey>),
}

/// What another replica changed, as its `NOTIFY` payload names it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChangeNotice {
    /// A node row was written (or deleted, when it is gone).
    Node {
        /// The replica that wrote it.
        from: String,
        /// The node.
        node_key: NodeKey,
    },
    /// An auth key row was written.
    AuthKey {
        /// The replica that wrote it.
        from: String,
        /// The key's id.
        id: u64,
    },
}

impl ChangeNotice {
    /// The replica that wrote the change.
    pub fn from(&self) -> &str {
        match self {
            ChangeNotice::Node { from, .. } | ChangeNotice::AuthKey { from, .. } => from,
        }
    }
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The `--db` argument is neither `sqlite:PATH` nor `postgres://...`.
    #[error("database {0:?} is neither sqlite:PATH nor postgres://... (or postgresql://...)")]
    BadUrl(String),
    /// The database file could not be made.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A stored record does not parse.
    #[error("stored record {key} does not parse: {error}")]
    BadRecord {
        /// Which row.
        key: String,
        /// The parse error.
        error: String,
    },
    /// The database was written by a newer binary.
    #[error("database schema version {0} is newer than this binary's {SCHEMA_VERSION}")]
    NewerSchema(i64),
}

/// The store of one server.
pub enum Store {
    /// A SQLite file.
    Sqlite(rusqlite::Connection),
    /// A PostgreSQL database, maybe shared with other replicas.
    Postgres(PgStore),
}

/// A PostgreSQL store: a client for reads and writes, and this replica's
/// id (the `from` of its notices).
pub struct PgStore {
    client: tokio_postgres::Client,
    replica_id: String,
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, json: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::BadRecord {
        key: key.to_string(),
        error: e.to_string(),
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Stored records hold only keys, strings, numbers and lists.
    serde_json::to_string(value).unwrap_or_default()
}

impl Store {
    /// Opens (and migrates) the database named by `url`. For PostgreSQL it
    /// also returns the notices of other replicas' writes.
    pub async fn open(
        url: &str,
        replica_id: &str,
    ) -> Result<(Store, Option<mpsc::UnboundedReceiver<ChangeNotice>>), StoreError> {
        if let Some(path) = url.strip_prefix("sqlite:") {
            let store = open_sqlite(PathBuf::from(path))?;
            return Ok((Store::Sqlite(store), None));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let (store, notices) = open_postgres(url, replica_id).await?;
            return Ok((Store::Postgres(store), Some(notices)));
        }
        Err(StoreError::BadUrl(url.to_string()))
    }

    /// Every stored record.
    pub async fn load(&mut self) -> Result<TailnetState, StoreError> {
        let (nodes, keys) = match self {
            Store::Sqlite(db) => {
                let mut nodes = Vec::new();
                let mut stmt =
                    db.prepare("SELECT node_key, record FROM nodes ORDER BY node_key")?;
                let rows =
                    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
                for row in rows {
                    nodes.push(row?);
                }
                let mut keys = Vec::new();
                let mut stmt = db.prepare("SELECT id, record FROM auth_keys ORDER BY id")?;
                let rows = stmt.query_map([], |r| {
                    Ok((r.get::<_, i64>(0)?.to_string(), r.get::<_, String>(1)?))
                })?;
                for row in rows {
                    keys.push(row?);
                }
                (nodes, keys)
            }
            Store::Postgres(pg) => {
                let nodes = pg
                    .client
                    .query("SELECT node_key, record FROM nodes ORDER BY node_key", &[])
                    .await?
                    .into_iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                    .collect();
                let keys = pg
                    .client
                    .query("SELECT id, record FROM auth_keys ORDER BY id", &[])
                    .await?
                    .into_iter()
                    .map(|r| (r.get::<_, i64>(0).to_string(), r.get::<_, String>(1)))
                    .collect();
                (nodes, keys)
            }
        };
        let mut state = TailnetState::default();
        for (key, json) in nodes {
            state.nodes.push(parse(&key, &json)?);
        }
        for (key, json) in keys {
            state.auth_keys.push(parse(&key, &json)?);
        }
        Ok(state)
    }

    /// Writes `records` in one transaction (all or nothing).
    pub async fn write(&mut self, records: &[Record]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        match self {
            Store::Sqlite(db) => {
                let tx = db.transaction()?;
                for record in records {
                    match record {
                        Record::Node(node) => {
                            tx.execute(
                                "INSERT INTO nodes (node_key, ipv4, record) VALUES (?1, ?2, ?3) \
                                 ON CONFLICT(node_key) DO UPDATE SET ipv4 = excluded.ipv4, record = excluded.record",
                                (node.node_key.to_string(), node.ipv4.to_string(), to_json(node)),
                            )?;
                        }
                        Record::ForgetNode(key) => {
                            tx.execute("DELETE FROM nodes WHERE node_key = ?1", [key.to_string()])?;
                        }
                        Record::AuthKey(key) => {
                            tx.execute(
                                "INSERT INTO auth_keys (id, record) VALUES (?1, ?2) \
                                 ON CONFLICT(id) DO UPDATE SET record = excluded.record",
                                (i64::try_from(key.id).unwrap_or(i64::MAX), to_json(key)),
                            )?;
                        }
                    }
                }
                tx.commit()?;
                Ok(())
            }
            Store::Postgres(pg) => pg.write(records).await,
        }
    }

    /// The stored record of one node (`None` when deleted), for applying
    /// another replica's change.
    pub async fn node(&mut self, key: &NodeKey) -> Result<Option<StoredNode>, StoreError> {
        let text = key.to_string();
        let json: Option<String> = match self {
            Store::Sqlite(db) => {
                let mut stmt = db.prepare("SELECT record FROM nodes WHERE node_key = ?1")?;
                let mut rows = stmt.query([&text])?;
                match rows.next()? {
                    Some(row) => Some(row.get(0)?),
                    None => None,
                }
            }
            Store::Postgres(pg) => pg
                .client
                .query_opt("SELECT record FROM nodes WHERE node_key = $1", &[&text])
                .await?
                .map(|r| r.get(0)),
        };
        json.map(|j| parse(&text, &j)).transpose()
    }

    /// The stored record of one auth key.
    pub async fn auth_key(&mut self, id: u64) -> Result<Option<StoredAuthKey>, StoreError> {
        let id = i64::try_from(id).unwrap_or(i64::MAX);
        let json: Option<String> = match self {
            Store::Sqlite(db) => {
                let mut stmt = db.prepare("SELECT record FROM auth_keys WHERE id = ?1")?;
                let mut rows = stmt.query([id])?;
                match rows.next()? {
                    Some(row) => Some(row.get(0)?),
                    None => None,
                }
            }
            Store::Postgres(pg) => pg
                .client
                .query_opt("SELECT record FROM auth_keys WHERE id = $1", &[&id])
                .await?
                .map(|r| r.get(0)),
        };
        json.map(|j| parse(&id.to_string(), &j)).transpose()
    }
}

fn open_sqlite(path: PathBuf) -> Result<rusqlite::Connection, StoreError> {
    // The file holds auth-key secrets: it is made private before SQLite
    // opens it (SQLite gives its -wal and -shm files the same mode).
    if !path.exists() {
        use std::os::unix::fs::OpenOptionsExt as _;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Io(path.clone(), e))?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| StoreError::Io(path.clone(), e))?;
    }
    let db = rusqlite::Connection::open(&path)?;
    // WAL: a commit is an append, readers never block the writer, and a
    // crash loses at most the last transactions, never the file.
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "NORMAL")?;
    db.pragma_update(None, "foreign_keys", "ON")?;
    let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema(version));
    }
    if version < 1 {
        db.execute_batch(
            "BEGIN;
             CREATE TABLE IF NOT EXISTS nodes (
                 node_key TEXT PRIMARY KEY,
                 ipv4 TEXT NOT NULL UNIQUE,
                 record TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS auth_keys (
                 id INTEGER PRIMARY KEY,
                 record TEXT NOT NULL
             );
             PRAGMA user_version = 1;
             COMMIT;",
        )?;
        tracing::info!(path = %path.display(), version = SCHEMA_VERSION, "sqlite schema created");
    }
    Ok(db)
}

async fn open_postgres(
    url: &str,
    replica_id: &str,
) -> Result<(PgStore, mpsc::UnboundedReceiver<ChangeNotice>), StoreError> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::error!(%error, "postgres connection ended");
        }
    });
    // One replica migrates at a time: the advisory lock is held until the
    // transaction ends.
    client
        .batch_execute(
            "BEGIN;
             SELECT pg_advisory_xact_lock(7461626);
             CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL);
             CREATE TABLE IF NOT EXISTS nodes (
                 node_key TEXT PRIMARY KEY,
                 ipv4 TEXT NOT NULL UNIQUE,
                 record TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS auth_keys (
                 id BIGINT PRIMARY KEY,
                 record TEXT NOT NULL
             );
             INSERT INTO schema_version (version)
                 SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM schema_version);
             COMMIT;",
        )
        .await?;
    let version: i64 = client
        .query_one("SELECT max(version) FROM schema_version", &[])
        .await?
        .get(0);
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema(version));
    }

    // A second connection only listens: notices arrive on the connection
    // object, which this task polls.
    let (listener, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let me = replica_id.to_string();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        use futures::StreamExt as _;
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    match serde_json::from_str::<ChangeNotice>(n.payload()) {
                        Ok(notice) if notice.from() == me => {}
                        Ok(notice) => {
                            if tx.send(notice).is_err() {
                                return;
                            }
                        }
                        Err(error) => {
                            tracing::warn!(%error, payload = n.payload(), "unreadable change notice")
                        }
                    }
                }
                Ok(other) => tracing::debug!(?other, "postgres message"),
                Err(error) => {
                    tracing::error!(%error, "postgres listen connection ended");
                    return;
                }
            }
        }
    });
    listener
        .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
        .await?;
    // The listener client must live as long as the connection: it is moved
    // into a task that only holds it.
    tokio::spawn(async move {
        let _keep = listener;
        std::future::pending::<()>().await;
    });
    Ok((
        PgStore {
            client,
            replica_id: replica_id.to_string(),
        },
        rx,
    ))
}

impl PgStore {
    async fn write(&mut self, records: &[Record]) -> Result<(), StoreError> {
        let tx = self.client.transaction().await?;
        for record in records {
            let notice = match record {
                Record::Node(node) => {
                    tx.execute(
                        "INSERT INTO nodes (node_key, ipv4, record) VALUES ($1, $2, $3) \
                         ON CONFLICT (node_key) DO UPDATE SET ipv4 = excluded.ipv4, record = excluded.record",
                        &[&node.node_key.to_string(), &node.ipv4.to_string(), &to_json(node)],
                    )
                    .await?;
                    ChangeNotice::Node {
                        from: self.replica_id.clone(),
                        node_key: node.node_key,
                    }
                }
                Record::ForgetNode(key) => {
                    tx.execute("DELETE FROM nodes WHERE node_key = $1", &[&key.to_string()])
                        .await?;
                    ChangeNotice::Node {
                        from: self.replica_id.clone(),
                        node_key: *key,
                    }
                }
                Record::AuthKey(key) => {
                    tx.execute(
                        "INSERT INTO auth_keys (id, record) VALUES ($1, $2) \
                         ON CONFLICT (id) DO UPDATE SET record = excluded.record",
                        &[&i64::try_from(key.id).unwrap_or(i64::MAX), &to_json(key)],
                    )
                    .await?;
                    ChangeNotice::AuthKey {
                        from: self.replica_id.clone(),
                        id: key.id,
                    }
                }
            };
            // Delivered to the listeners when the transaction commits, and
            // not at all when it rolls back.
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&NOTIFY_CHANNEL, &to_json(&notice)],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
