//! Replication commands: simple queries, IDENTIFY_SYSTEM, slots, and START_REPLICATION, which
//! hands the connection to the stream's driver.

use postgres_protocol::message::frontend;

use super::stream::{self, ReplicationStream};
use super::{
    CreatedSlot, PgOutputOptions, QueryResult, ReplicationClient, ReplicationError, SnapshotAction,
    Streaming, SystemIdentity,
};
use crate::model::Lsn;
use crate::pg::ServerError;
use crate::pg::backend;
use crate::quote::{ident_list, quote_ident, quote_literal};

impl ReplicationClient {
    /// Runs one replication command or SQL statement and collects its text rows.
    pub async fn simple_query(&mut self, command: &str) -> Result<QueryResult, ReplicationError> {
        frontend::query(command, &mut self.outbuf).map_err(|e| self.protocol(e.to_string()))?;
        self.flush().await?;
        let mut result = QueryResult::default();
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'T' => result.columns = backend::row_description(frame.body),
                b'D' => result.rows.push(
                    backend::data_row(frame.body)
                        .ok_or_else(|| self.protocol("malformed DataRow".into()))?,
                ),
                b'E' => error = Some(Box::new(ServerError::parse(&frame.body))),
                b'C' | b'I' | b'N' | b'S' => {}
                b'Z' => break,
                other => {
                    return Err(self.protocol(format!(
                        "unexpected message {:?} in reply to {command}",
                        other as char
                    )));
                }
            }
        }
        match error {
            Some(source) => Err(ReplicationError::Server {
                target: self.target.clone(),
                command: first_word(command),
                source,
            }),
            None => Ok(result),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let result = self.simple_query("IDENTIFY_SYSTEM").await?;
        let field = |name: &str| result.first(name).map(str::to_owned);
        let missing = |name: &str| self.protocol(format!("IDENTIFY_SYSTEM lacks {name}"));
        Ok(SystemIdentity {
            system_id: field("systemid").ok_or_else(|| missing("systemid"))?,
            timeline: field("timeline")
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| missing("timeline"))?,
            xlogpos: field("xlogpos")
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| missing("xlogpos"))?,
            dbname: field("dbname"),
        })
    }

    /// Creates a pgoutput slot. With [`SnapshotAction::Export`] the snapshot stays usable by other
    /// sessions until this connection runs its next command or closes.
    /// With `failover` (PostgreSQL 17+), standbys that synchronize slots keep this one.
    pub async fn create_logical_slot(
        &mut self,
        slot: &str,
        temporary: bool,
        snapshot: SnapshotAction,
        failover: bool,
    ) -> Result<CreatedSlot, ReplicationError> {
        let temporary = if temporary { " TEMPORARY" } else { "" };
        // PostgreSQL 15 introduced the parenthesized option list; 14 knows only the keywords.
        let failover = if failover { ", FAILOVER true" } else { "" };
        let snapshot_clause = match (self.server_version_num >= 150000, snapshot) {
            (true, SnapshotAction::Export) => format!(" (SNAPSHOT 'export'{failover})"),
            (true, SnapshotAction::Use) => format!(" (SNAPSHOT 'use'{failover})"),
            (true, SnapshotAction::Nothing) => format!(" (SNAPSHOT 'nothing'{failover})"),
            (false, SnapshotAction::Export) => " EXPORT_SNAPSHOT".into(),
            (false, SnapshotAction::Use) => " USE_SNAPSHOT".into(),
            (false, SnapshotAction::Nothing) => " NOEXPORT_SNAPSHOT".into(),
        };
        let command = format!(
            "CREATE_REPLICATION_SLOT {}{temporary} LOGICAL pgoutput{snapshot_clause}",
            quote_ident(slot)
        );
        let result = self.simple_query(&command).await?;
        let consistent_point = result
            .first("consistent_point")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| {
                self.protocol("CREATE_REPLICATION_SLOT gave no consistent_point".into())
            })?;
        Ok(CreatedSlot {
            slot_name: result.first("slot_name").unwrap_or(slot).to_owned(),
            consistent_point,
            snapshot_name: result.first("snapshot_name").map(str::to_owned),
            output_plugin: result
                .first("output_plugin")
                .unwrap_or("pgoutput")
                .to_owned(),
        })
    }

    /// Drops a slot; with `wait`, waits for another session using it to let go instead of failing.
    pub async fn drop_slot(&mut self, slot: &str, wait: bool) -> Result<(), ReplicationError> {
        let wait = if wait { " WAIT" } else { "" };
        self.simple_query(&format!(
            "DROP_REPLICATION_SLOT {}{wait}",
            quote_ident(slot)
        ))
        .await?;
        Ok(())
    }

    /// Starts streaming from `slot` at `start` (the server starts at the later of `start` and the
    /// slot's confirmed position) and hands the socket to a driver task.
    pub async fn start_logical(
        mut self,
        slot: &str,
        start: Lsn,
        options: &PgOutputOptions,
    ) -> Result<ReplicationStream, ReplicationError> {
        let mut plugin_options = vec![
            format!(
                "proto_version {}",
                quote_literal(&options.proto_version.to_string())
            ),
            format!(
                "publication_names {}",
                quote_literal(&ident_list(options.publications.iter().map(String::as_str)))
            ),
        ];
        if options.binary {
            plugin_options.push("binary 'true'".into());
        }
        if options.messages {
            plugin_options.push("messages 'true'".into());
        }
        match options.streaming {
            Streaming::Off => {}
            Streaming::On => plugin_options.push("streaming 'on'".into()),
            Streaming::Parallel => plugin_options.push("streaming 'parallel'".into()),
        }
        let command = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({})",
            quote_ident(slot),
            plugin_options.join(", ")
        );
        frontend::query(&command, &mut self.outbuf).map_err(|e| self.protocol(e.to_string()))?;
        self.flush().await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'W' => break,
                b'E' => {
                    let source = Box::new(ServerError::parse(&frame.body));
                    return Err(ReplicationError::Server {
                        target: self.target.clone(),
                        command: "START_REPLICATION".into(),
                        source,
                    });
                }
                b'N' => {}
                other => {
                    return Err(self.protocol(format!(
                        "unexpected message {:?} in reply to START_REPLICATION",
                        other as char
                    )));
                }
            }
        }
        Ok(stream::spawn(self, options))
    }
}

fn first_word(command: &str) -> String {
    command.split_whitespace().next().unwrap_or("").to_owned()
}
