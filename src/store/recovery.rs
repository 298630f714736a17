//! Recovery of missed events: each connection's durable cursor into Stripe's event log, the
//! progress of a run, the lease that keeps one process per connection, and storing a page
//! of recovered events together with that progress.
//!
//! Stripe lists newest first, so a run walks backwards from `run_until` to `run_since`:
//! each committed page records its oldest event (`run_after`, where the next page starts),
//! and only the end of the run moves `recovered_through` forward. A process killed between
//! pages leaves the run's progress behind, and the next lease holder resumes it.

use sqlx::{Encode, Executor, FromRow, IntoArguments, Type};
use time::OffsetDateTime;

use super::dialect::Dialect;
use super::events::{EventRef, Inserted};
use super::model::{NewEvent, StoredWebhook};
use super::rows::{parse_mode, parse_tenant_id};
use super::sql_store::SqlStore;
use super::StoreError;
use crate::domain::{Mode, TenantId};

/// Creates the cursor of every connection with a webhook endpoint that has none yet,
/// starting where the connection started, due now (`$1`).
const ENSURE_CURSORS: &str = "INSERT INTO recovery_cursors \
    (connection_id, tenant_id, recovered_through, due_at) \
    SELECT c.connection_id, c.tenant_id, c.connected_at, $1 FROM stripe_connections c \
    WHERE c.webhook_endpoint_id IS NOT NULL AND NOT EXISTS \
    (SELECT 1 FROM recovery_cursors r WHERE r.connection_id = c.connection_id) \
    ON CONFLICT (connection_id) DO NOTHING";

/// The same for one connection (`$1`), whether or not it has an endpoint.
const ENSURE_CURSOR: &str = "INSERT INTO recovery_cursors \
    (connection_id, tenant_id, recovered_through, due_at) \
    SELECT c.connection_id, c.tenant_id, c.connected_at, $2 FROM stripe_connections c \
    WHERE c.connection_id = $1 ON CONFLICT (connection_id) DO NOTHING";

/// Cursors of connections that are gone (disconnected or replaced by a new connection id).
const DROP_ORPHAN_CURSORS: &str = "DELETE FROM recovery_cursors WHERE NOT EXISTS \
    (SELECT 1 FROM stripe_connections c WHERE c.connection_id = recovery_cursors.connection_id)";

/// Leases due cursors (`$1` owner, `$2` lease end, `$3` now, `$4` at most);
/// `Dialect::SKIP_LOCKED` goes between the two halves. The outer lease check is evaluated
/// again on the locked row, so two claimers never both win one cursor.
const CLAIM_DUE_RECOVERIES: [&str; 2] = [
    "UPDATE recovery_cursors SET lease_owner = $1, lease_until = $2 \
     WHERE (lease_until IS NULL OR lease_until < $3) AND connection_id IN \
     (SELECT r.connection_id FROM recovery_cursors r \
     WHERE r.event_recovery = 'on' AND r.due_at <= $3 \
     AND (r.lease_until IS NULL OR r.lease_until < $3) \
     AND EXISTS (SELECT 1 FROM stripe_connections c \
     WHERE c.connection_id = r.connection_id AND c.status <> 'revoked') \
     ORDER BY r.due_at LIMIT $4",
    ") RETURNING connection_id, tenant_id",
];

const FIND_CURSOR: &str = "SELECT r.connection_id, r.tenant_id, r.event_recovery, \
    r.webhook_status, r.recovered_through, r.requested_since, r.run_since, r.run_until, \
    r.run_after, r.last_run_at, \
    (SELECT MAX(e.created) FROM webhook_events e WHERE e.connection_id = r.connection_id) \
    AS last_event_created FROM recovery_cursors r WHERE r.connection_id = $1";

/// Starts a run (`$3` since, `$4` until) under the lease, taking any requested start.
const BEGIN_RUN: &str = "UPDATE recovery_cursors SET run_since = $3, run_until = $4, \
    run_after = NULL, requested_since = NULL WHERE connection_id = $1 AND lease_owner = $2";

/// A page's progress, and a longer lease (`$4`), under the lease; the first write of the
/// page's transaction.
const RECORD_PAGE: &str = "UPDATE recovery_cursors SET run_after = $3, lease_until = $4 \
    WHERE connection_id = $1 AND lease_owner = $2";

/// Ends a run: the cursor moves to `$3`, next due `$4` (or now, `$5`, when a recovery was
/// requested meanwhile), and the lease is given back.
const FINISH_RUN: &str = "UPDATE recovery_cursors SET recovered_through = CASE \
    WHEN recovered_through > $3 THEN recovered_through ELSE $3 END, \
    run_since = NULL, run_until = NULL, run_after = NULL, last_run_at = $5, \
    due_at = CASE WHEN requested_since IS NULL THEN $4 ELSE $5 END, \
    lease_owner = NULL, lease_until = NULL WHERE connection_id = $1 AND lease_owner = $2";

const RELEASE_RECOVERY: &str = "UPDATE recovery_cursors SET lease_owner = NULL, \
    lease_until = NULL, due_at = $3 WHERE connection_id = $1 AND lease_owner = $2";

/// Asks for a recovery from `$3` as soon as possible (`$2` now).
const REQUEST_RECOVERY: &str = "UPDATE recovery_cursors SET due_at = $2, \
    requested_since = $3 WHERE connection_id = $1";

/// What a verification found (`$3` event recovery on/off, `$4` endpoint status), due at
/// `$2` when it calls for a recovery, else when it was due.
const RECORD_HEALTH: &str = "UPDATE recovery_cursors SET event_recovery = $3, \
    webhook_status = $4, due_at = CASE WHEN $5 = 'now' THEN $2 ELSE due_at END \
    WHERE connection_id = $1";

/// Our endpoint registered again (`$4`…`$8`), only while the connection still has the key
/// `$2` and the endpoint `$3` (compare-and-swap).
const REPLACE_WEBHOOK: &str = "UPDATE stripe_connections SET webhook_endpoint_id = $4, \
    webhook_secret_id = $5, webhook_master_key_id = $6, webhook_wrapped_key = $7, \
    webhook_ciphertext = $8 WHERE tenant_id = $1 AND api_key_secret_id = $2 \
    AND webhook_endpoint_id = $3";

/// The oldest cursor per mode among connections whose events are recovered.
const OLDEST_CURSORS: &str = "SELECT c.mode, MIN(r.recovered_through) \
    FROM recovery_cursors r JOIN stripe_connections c ON c.connection_id = r.connection_id \
    WHERE r.event_recovery = 'on' AND c.status <> 'revoked' GROUP BY c.mode ORDER BY c.mode";

/// Where a stored event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventSource {
    /// Delivered by Stripe to our endpoint.
    Webhook,
    /// Found in Stripe's event log after a missed delivery.
    Recovered,
}

impl EventSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Recovered => "recovered",
        }
    }
}

/// What the last verification found of our webhook endpoint on Stripe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookStatus {
    Enabled,
    /// Stripe turned it off after failed deliveries.
    Disabled,
    /// Deleted on Stripe's side.
    Missing,
}

impl WebhookStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
            Self::Missing => "missing",
        }
    }

    fn parse(raw: &str) -> Result<Self, StoreError> {
        match raw {
            "enabled" => Ok(Self::Enabled),
            "disabled" => Ok(Self::Disabled),
            "missing" => Ok(Self::Missing),
            other => Err(StoreError::Corrupt(format!("webhook status {other:?}"))),
        }
    }
}

/// A run in progress: listing events created at or after `since`, up to `until`, and past
/// the event `after` (the oldest of the last committed page) when set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryRun {
    pub since: OffsetDateTime,
    pub until: OffsetDateTime,
    pub after: Option<String>,
}

/// A connection's recovery cursor.
#[derive(Clone, Debug)]
pub struct RecoveryCursor {
    pub connection_id: String,
    pub tenant_id: TenantId,
    /// The key may read Events (`GET /v1/events`).
    pub event_recovery: bool,
    pub webhook_status: WebhookStatus,
    /// Every event created before this is stored.
    pub recovered_through: OffsetDateTime,
    pub requested_since: Option<OffsetDateTime>,
    pub run: Option<RecoveryRun>,
    pub last_run_at: Option<OffsetDateTime>,
    /// `created` of the newest stored event of this connection (unix seconds).
    pub last_event_created: Option<i64>,
}

/// A leased cursor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryClaim {
    pub connection_id: String,
    pub tenant_id: TenantId,
}

#[derive(sqlx::FromRow)]
pub struct RecoveryCursorRow {
    connection_id: String,
    tenant_id: String,
    event_recovery: String,
    webhook_status: String,
    recovered_through: OffsetDateTime,
    requested_since: Option<OffsetDateTime>,
    run_since: Option<OffsetDateTime>,
    run_until: Option<OffsetDateTime>,
    run_after: Option<String>,
    last_run_at: Option<OffsetDateTime>,
    last_event_created: Option<i64>,
}

impl TryFrom<RecoveryCursorRow> for RecoveryCursor {
    type Error = StoreError;

    fn try_from(row: RecoveryCursorRow) -> Result<Self, StoreError> {
        let run = match (row.run_since, row.run_until) {
            (Some(since), Some(until)) => Some(RecoveryRun {
                since,
                until,
                after: row.run_after,
            }),
            _ => None,
        };
        Ok(Self {
            connection_id: row.connection_id,
            tenant_id: parse_tenant_id(&row.tenant_id)?,
            event_recovery: row.event_recovery == "on",
            webhook_status: WebhookStatus::parse(&row.webhook_status)?,
            recovered_through: row.recovered_through,
            requested_since: row.requested_since,
            run,
            last_run_at: row.last_run_at,
            last_event_created: row.last_event_created,
        })
    }
}

impl<DB: Dialect> SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
    for<'r> (String, String): FromRow<'r, DB::Row>,
    for<'r> (String, OffsetDateTime): FromRow<'r, DB::Row>,
    for<'r> RecoveryCursorRow: FromRow<'r, DB::Row>,
{
    pub(super) async fn claim_due_recoveries(
        &self,
        owner: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<RecoveryClaim>, StoreError> {
        // Cursors follow the connections: new ones get one, gone ones lose theirs.
        sqlx::query(ENSURE_CURSORS)
            .bind(now)
            .execute(&self.pool)
            .await?;
        sqlx::query(DROP_ORPHAN_CURSORS).execute(&self.pool).await?;
        let [head, tail] = CLAIM_DUE_RECOVERIES;
        let statement = [head, DB::SKIP_LOCKED, tail].concat();
        let claimed: Vec<(String, String)> = sqlx::query_as(&statement)
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        claimed
            .into_iter()
            .map(|(connection_id, tenant)| {
                Ok(RecoveryClaim {
                    connection_id,
                    tenant_id: parse_tenant_id(&tenant)?,
                })
            })
            .collect()
    }

    pub(super) async fn find_recovery_cursor(
        &self,
        connection_id: &str,
    ) -> Result<Option<RecoveryCursor>, StoreError> {
        sqlx::query(ENSURE_CURSOR)
            .bind(connection_id)
            .bind(crate::clock::now())
            .execute(&self.pool)
            .await?;
        let row: Option<RecoveryCursorRow> = sqlx::query_as(FIND_CURSOR)
            .bind(connection_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(TryInto::try_into).transpose()
    }

    pub(super) async fn begin_recovery_run(
        &self,
        connection_id: &str,
        owner: &str,
        since: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(BEGIN_RUN)
            .bind(connection_id)
            .bind(owner)
            .bind(since)
            .bind(until)
            .execute(&self.pool)
            .await?;
        Ok(DB::rows_affected(&result) == 1)
    }

    pub(super) async fn store_recovered_page(
        &self,
        tenant: &TenantId,
        connection_id: &str,
        owner: &str,
        events: &[NewEvent],
        after: &str,
        lease_until: OffsetDateTime,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // First the progress, under the lease: a process that lost its lease stores nothing.
        let result = sqlx::query(RECORD_PAGE)
            .bind(connection_id)
            .bind(owner)
            .bind(after)
            .bind(lease_until)
            .execute(&mut *tx)
            .await?;
        if DB::rows_affected(&result) != 1 {
            return Ok(None);
        }
        // The same batched insert as deliveries: one statement per page on PostgreSQL.
        let rows: Vec<EventRef<'_>> = (events.iter())
            .map(|event| EventRef {
                tenant,
                connection_id,
                // Listed from Stripe with the API key: no webhook secret to hold it to.
                webhook_secret_id: None,
                event,
            })
            .collect();
        let stored = (DB::insert_events(&mut tx, &rows, EventSource::Recovered).await?)
            .into_iter()
            .filter(|&inserted| inserted == Inserted::Stored)
            .count() as u64;
        tx.commit().await?;
        Ok(Some(stored))
    }

    pub(super) async fn finish_recovery_run(
        &self,
        connection_id: &str,
        owner: &str,
        through: OffsetDateTime,
        next_due: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(FINISH_RUN)
            .bind(connection_id)
            .bind(owner)
            .bind(through)
            .bind(next_due)
            .bind(crate::clock::now())
            .execute(&self.pool)
            .await?;
        Ok(DB::rows_affected(&result) == 1)
    }

    pub(super) async fn release_recovery(
        &self,
        connection_id: &str,
        owner: &str,
        due_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query(RELEASE_RECOVERY)
            .bind(connection_id)
            .bind(owner)
            .bind(due_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) async fn request_recovery(
        &self,
        connection_id: &str,
        since: Option<OffsetDateTime>,
    ) -> Result<Option<RecoveryCursor>, StoreError> {
        let Some(cursor) = self.find_recovery_cursor(connection_id).await? else {
            return Ok(None);
        };
        // Never later than the cursor or an earlier request: a request widens a recovery,
        // it never skips events the cursor has not passed yet.
        let mut start = cursor.recovered_through;
        for earlier in [since, cursor.requested_since].into_iter().flatten() {
            start = start.min(earlier);
        }
        sqlx::query(REQUEST_RECOVERY)
            .bind(connection_id)
            .bind(crate::clock::now())
            .bind(start)
            .execute(&self.pool)
            .await?;
        Ok(Some(RecoveryCursor {
            requested_since: Some(start),
            ..cursor
        }))
    }

    pub(super) async fn record_webhook_health(
        &self,
        connection_id: &str,
        event_recovery: bool,
        status: WebhookStatus,
        recover_now: bool,
    ) -> Result<(), StoreError> {
        let now = crate::clock::now();
        sqlx::query(ENSURE_CURSOR)
            .bind(connection_id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        sqlx::query(RECORD_HEALTH)
            .bind(connection_id)
            .bind(now)
            .bind(if event_recovery { "on" } else { "off" })
            .bind(status.as_str())
            .bind(if recover_now { "now" } else { "later" })
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) async fn replace_webhook(
        &self,
        tenant: &TenantId,
        secret_id: &str,
        old_endpoint_id: &str,
        new: &StoredWebhook,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(REPLACE_WEBHOOK)
            .bind(tenant.as_str())
            .bind(secret_id)
            .bind(old_endpoint_id)
            .bind(new.endpoint_id.as_str())
            .bind(new.secret_id.as_str())
            .bind(new.sealed.master_key_id.as_str())
            .bind(new.sealed.wrapped_key.as_slice())
            .bind(new.sealed.ciphertext.as_slice())
            .execute(&self.pool)
            .await?;
        Ok(DB::rows_affected(&result) == 1)
    }

    pub(super) async fn oldest_recovery_cursors(
        &self,
    ) -> Result<Vec<(Mode, OffsetDateTime)>, StoreError> {
        let rows: Vec<(String, OffsetDateTime)> =
            sqlx::query_as(OLDEST_CURSORS).fetch_all(&self.pool).await?;
        rows.into_iter()
            .map(|(mode, oldest)| Ok((parse_mode(&mode)?, oldest)))
            .collect()
    }
}
