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

    pub(super) async fn insert_webhook_event(
        &self,
        tenant: &TenantId,
        connection_id: &str,
        event: &NewEvent,
    ) -> Result<bool, StoreError> {
        // Redeliveries are the common duplicate: answer them with one read.
        let seen: i64 = sqlx::query_scalar(queries::EVENT_SEEN)
            .bind(connection_id)
            .bind(event.event_id.as_str())
            .fetch_one(&self.pool)
            .await?;
        if seen > 0 {
            return Ok(false);
        }
        DB::insert_event_in_feed_order(&self.pool, tenant, connection_id, event).await
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
