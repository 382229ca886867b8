//! Statements on the wire: each set-based statement is sent at once and its response read later,
//! in order, so production works while the next statements are built.

use bytes::Bytes;
use tokio_postgres::Statement;
use tokio_postgres::types::{ToSql, Type};

use super::error::query_error;
use super::{Applier, ApplyError};
use crate::change::{Entry, Key, Source};

/// A text[] parameter made of the bytes staging sent, without copying them (binary array
/// format; the server checks the text's encoding as it receives it).
#[derive(Debug)]
pub(super) struct TextArray(pub(super) Vec<Option<Bytes>>);

impl ToSql for TextArray {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use bytes::BufMut;
        let len = i32::try_from(self.0.len())?;
        out.put_i32(1); // dimensions
        out.put_i32(i32::from(self.0.iter().any(Option::is_none)));
        out.put_u32(Type::TEXT.oid());
        out.put_i32(len);
        out.put_i32(1); // lower bound
        for value in &self.0 {
            match value {
                None => out.put_i32(-1),
                Some(bytes) => {
                    out.put_i32(i32::try_from(bytes.len())?);
                    out.put_slice(bytes);
                }
            }
        }
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TEXT_ARRAY
    }

    tokio_postgres::types::to_sql_checked!();
}

/// What a sent statement reports: the ordinals it returned, or only its row count.
pub(super) enum Reported {
    Ordinals(Vec<i64>),
    Count(u64),
}

pub(super) type QueryFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Reported, tokio_postgres::Error>> + Send>,
>;

/// What a sent statement's reported ordinals mean.
pub(super) enum Purpose {
    /// Per ordinal: the key and source of a plain delete (a conflict if not deleted), or `None`
    /// for a replaced row.
    Deletes {
        table: usize,
        targets: Vec<Option<(Key, Source)>>,
    },
    /// Ordinals are rows not inserted (key taken), for `entries` in order.
    Inserts { table: usize, entries: Vec<Entry> },
    /// A row count; when short, the rows of `entries` production lacks are conflicts.
    Updates { table: usize, entries: Vec<Entry> },
    /// Key-map writes: nothing to check beyond success.
    KeyMap,
    /// The snapshot a batch's watched tables are written under: nothing to check.
    EditSnapshot,
    /// Ordinals are keys of `table` whose row sync wrote while a production edit of it
    /// committed: the batch must be applied again.
    EditRace { table: usize },
    /// The batch's BEGIN, sent ahead of its first statement.
    Begin,
}

/// SQLSTATE of a statement sent after another failed in the same transaction.
pub(super) const IN_FAILED_TRANSACTION: &str = "25P02";

impl Purpose {
    /// What the statement does, for errors.
    pub(super) fn what(&self) -> &'static str {
        match self {
            Purpose::Deletes { .. } => "applying deletes",
            Purpose::Inserts { .. } => "applying inserts",
            Purpose::Updates { .. } => "applying updates",
            Purpose::KeyMap => "writing the key map",
            Purpose::EditSnapshot => "noting the snapshot production's edits are read in",
            Purpose::EditRace { .. } => "looking for production edits made meanwhile",
            Purpose::Begin => "BEGIN",
        }
    }
}

/// A statement's response, unless the task reading it was lost.
pub(super) fn lost_response<T>(
    joined: Result<Result<T, tokio_postgres::Error>, tokio::task::JoinError>,
) -> Result<Result<T, tokio_postgres::Error>, ApplyError> {
    joined.map_err(|e| ApplyError::Schema(format!("a statement's response was lost: {e}")))
}

/// A statement sent and not yet settled. Its response is read by a task of its own: the
/// connection hands responses over through small channels, so a response nobody reads would
/// stall every later one (the next prepare included).
pub(super) struct InFlight {
    pub(super) result: tokio::task::JoinHandle<Result<Reported, tokio_postgres::Error>>,
    pub(super) purpose: Purpose,
}

/// Puts a request on the wire now and leaves its response to a task. The first poll, here,
/// encodes the request and hands it to the connection, so requests reach production in the
/// order they were started.
pub(super) async fn start<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut future = Box::pin(future);
    let mut done = None;
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(result) = future.as_mut().poll(cx) {
            done = Some(result);
        }
        std::task::Poll::Ready(())
    })
    .await;
    match done {
        Some(result) => tokio::spawn(async move { result }),
        None => tokio::spawn(future),
    }
}

impl Applier {
    pub(super) async fn statement(
        &mut self,
        sql: String,
        params: usize,
    ) -> Result<Statement, ApplyError> {
        if let Some(statement) = self.statements.get(&sql) {
            return Ok(statement.clone());
        }
        let types = vec![Type::TEXT_ARRAY; params];
        let statement = match self.client.prepare_typed(&sql, &types).await {
            Ok(statement) => statement,
            Err(e) => {
                // A statement sent before may have failed and aborted the transaction, and the
                // prepare failed only because of that: that statement's error is the one to
                // report (a unique violation there may be an ordering artefact to replay).
                Box::pin(self.settle()).await?;
                return Err(query_error("preparing a statement")(e));
            }
        };
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    /// Runs a statement (parameters: text arrays) now and returns its rows; `what` names it in
    /// an error.
    pub(super) async fn query_now(
        &mut self,
        sql: String,
        columns: &[TextArray],
        what: &str,
    ) -> Result<Vec<tokio_postgres::Row>, ApplyError> {
        let statement = self.statement(sql, columns.len()).await?;
        let refs: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        self.client
            .query(&statement, &refs)
            .await
            .map_err(query_error(what))
    }

    /// [`Applier::query_now`] for a statement whose row count is all it reports.
    pub(super) async fn execute_now(
        &mut self,
        sql: String,
        columns: &[TextArray],
        what: &str,
    ) -> Result<u64, ApplyError> {
        let statement = self.statement(sql, columns.len()).await?;
        let refs: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        self.client
            .execute(&statement, &refs)
            .await
            .map_err(query_error(what))
    }

    /// Sends a set-based statement (parameters: text arrays) and returns at once; the request is
    /// on the wire, in order after everything sent before it.
    pub(super) async fn send(
        &mut self,
        sql: String,
        columns: Vec<TextArray>,
        purpose: Purpose,
    ) -> Result<(), ApplyError> {
        let statement = self.statement(sql, columns.len()).await?;
        let client = self.client.clone();
        let count_only = matches!(
            purpose,
            Purpose::Updates { .. } | Purpose::KeyMap | Purpose::EditSnapshot
        );
        let future: QueryFuture = Box::pin(async move {
            let refs: Vec<&(dyn ToSql + Sync)> =
                columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
            if count_only {
                client.execute(&statement, &refs).await.map(Reported::Count)
            } else {
                let rows = client.query(&statement, &refs).await?;
                Ok(Reported::Ordinals(
                    rows.iter().map(|r| r.get::<_, i64>(0)).collect(),
                ))
            }
        });
        self.launch(future, purpose).await;
        Ok(())
    }

    /// Puts a request on the wire now, in order after everything sent before it, and leaves
    /// its response to [`Applier::settle`].
    pub(super) async fn launch(&mut self, future: QueryFuture, purpose: Purpose) {
        let result = start(future).await;
        self.in_flight.push(InFlight { result, purpose });
    }

    /// Waits for every statement sent and applies the conflict policy to what they reported.
    /// The first error is the root cause: statements are awaited in the order they ran.
    pub(super) async fn settle(&mut self) -> Result<(), ApplyError> {
        let mut in_flight = std::mem::take(&mut self.in_flight).into_iter();
        while let Some(flight) = in_flight.next() {
            let what = flight.purpose.what();
            let reported = lost_response(flight.result.await)?.map_err(query_error(what))?;
            if let Err(e) = self.settle_one(flight.purpose, reported).await {
                // A conflict lookup fails with "transaction is aborted" when a later statement,
                // already run, failed: that statement's error is the one to report (a unique
                // violation there may be an ordering artefact to replay one by one).
                if e.sqlstate() == Some(IN_FAILED_TRANSACTION) {
                    for later in in_flight {
                        let what = later.purpose.what();
                        if let Err(source) = lost_response(later.result.await)? {
                            let root = query_error(what)(source);
                            if root.sqlstate() != Some(IN_FAILED_TRANSACTION) {
                                return Err(root);
                            }
                        }
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }
}
