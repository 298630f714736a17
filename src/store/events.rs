//! Webhook events: finding the connection a webhook URL names, storing each verified event
//! once, and the tenant's feed.

use sqlx::{Encode, Executor, FromRow, IntoArguments, Type};
use time::OffsetDateTime;

use super::dialect::Dialect;
use super::model::{EventCursor, NewEvent, StoredEvent, WebhookTarget};
use super::rows::WebhookTargetRow;
use super::sql_store::SqlStore;
use super::{queries, StoreError};
use crate::domain::TenantId;

/// One verified delivery to store: the event, the tenant and connection it came to, and
/// the webhook secret its signature was checked with.
#[derive(Clone, Debug)]
pub struct EventInsert {
    pub tenant: TenantId,
    pub connection_id: String,
    pub webhook_secret_id: String,
    pub event: NewEvent,
}

impl EventInsert {
    pub fn as_ref(&self) -> EventRef<'_> {
        EventRef {
            tenant: &self.tenant,
            connection_id: &self.connection_id,
            webhook_secret_id: Some(&self.webhook_secret_id),
            event: &self.event,
        }
    }
}

/// An event to insert, borrowed (a recovered page shares one tenant and connection).
#[derive(Clone, Copy, Debug)]
pub struct EventRef<'a> {
    pub tenant: &'a TenantId,
    pub connection_id: &'a str,
    /// Stored only while the connection still has this webhook secret (a delivery checked
    /// against a cached secret); `None`: no such condition (recovered events).
    pub webhook_secret_id: Option<&'a str>,
    pub event: &'a NewEvent,
}

/// What became of one event of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    Stored,
    /// Stored before, or earlier in the same batch.
    Duplicate,
    /// Nothing stored: the connection no longer has the webhook secret the delivery was
    /// checked with (its endpoint was replaced, or it was disconnected).
    SecretChanged,
}

/// Which rows of a batch to insert: the first of each (connection, event id), in key
/// order. The key order is the order the unique index is written in, so two concurrent
/// batches holding the same events wait for each other instead of deadlocking. Returns
/// the rows to insert and, for each input row, the index of its row among them, or
/// `None` for a repeat of an earlier row (a duplicate whatever the database holds).
pub(super) fn first_of_each<'r, 'a>(
    rows: &'r [EventRef<'a>],
) -> (Vec<&'r EventRef<'a>>, Vec<Option<usize>>) {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    // Stable: of equal keys, the earliest row comes first and is the one inserted.
    order.sort_by_key(|&i| (rows[i].connection_id, rows[i].event.event_id.as_str()));
    let mut unique: Vec<&EventRef<'a>> = Vec::with_capacity(rows.len());
    let mut slot = vec![None; rows.len()];
    for i in order {
        let key = (rows[i].connection_id, rows[i].event.event_id.as_str());
        let repeat = unique
            .last()
            .is_some_and(|last| (last.connection_id, last.event.event_id.as_str()) == key);
        if !repeat {
            slot[i] = Some(unique.len());
            unique.push(&rows[i]);
        }
    }
    (unique, slot)
}

impl<DB: Dialect> SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> WebhookTargetRow: FromRow<'r, DB::Row>,
    for<'r> StoredEvent: FromRow<'r, DB::Row>,
{
    pub(super) async fn find_webhook_target(
        &self,
        connection_id: &str,
    ) -> Result<Option<WebhookTarget>, StoreError> {
        let row: Option<WebhookTargetRow> = sqlx::query_as(queries::FIND_WEBHOOK_TARGET)
            .bind(connection_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(TryInto::try_into).transpose()
    }

    pub(super) async fn insert_webhook_events(
        &self,
        batch: &[EventInsert],
    ) -> Result<Vec<Inserted>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // No read before the write: a redelivery, and a secret replaced since the delivery
        // was checked, are answered by the same statement (it inserts nothing for them), so
        // a batch costs one round trip whatever it holds.
        let rows: Vec<EventRef<'_>> = batch.iter().map(EventInsert::as_ref).collect();
        DB::insert_events_in_feed_order(&self.pool, &rows).await
    }

    pub(super) async fn list_events(
        &self,
        tenant: &TenantId,
        after: EventCursor,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let [head, tail] = queries::LIST_EVENTS;
        let statement = [head, DB::FEED_HORIZON, tail].concat();
        Ok(sqlx::query_as(&statement)
            .bind(tenant.as_str())
            .bind(after.txid)
            .bind(after.seq)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    pub(super) async fn delete_old_events(
        &self,
        before: OffsetDateTime,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let [head, tail] = queries::DELETE_OLD_EVENTS;
        let statement = [head, DB::SKIP_LOCKED, tail].concat();
        let deleted = sqlx::query(&statement)
            .bind(before)
            .bind(limit)
            .execute(&self.pool)
            .await?;
        Ok(DB::rows_affected(&deleted))
    }
}
