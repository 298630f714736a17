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
use super::rows::parse_tenant_id;
use super::sql_store::SqlStore;
use super::StoreError;
use crate::domain::{Mode, TenantId};

/// Leases due cursors (`$1` owner, `$2` lease end, `$3` now, `$4` at most);
/// `Dialect::claim` puts the parts together. The outer lease check is evaluated again on the
/// locked row, so two claimers never both win one cursor. A range scan of the partial index
/// `recovery_cursors_due`: the cursor of a revoked connection is claimed too (the run finds
/// it gone and puts it off to the sweep) rather than filtered here, where it would stay due
/// and be walked past by every claim.
pub(super) const CLAIM_DUE_RECOVERIES: [&str; 3] = [
    "UPDATE recovery_cursors SET lease_owner = $1, lease_until = $2 \
     WHERE (lease_until IS NULL OR lease_until < $3) AND connection_id",
    "SELECT r.connection_id FROM recovery_cursors r \
     WHERE r.event_recovery = 'on' AND r.due_at <= $3 \
     AND (r.lease_until IS NULL OR r.lease_until < $3) \
     ORDER BY r.due_at LIMIT $4",
    " RETURNING connection_id, tenant_id",
];

/// The fleet's heartbeat: the last time any instance's recovery worker swept.
const HEARTBEAT: &str = "recovery";

const FIRST_BEAT: &str = "INSERT INTO fleet_heartbeats (name, beat_at) VALUES ($1, $2) \
    ON CONFLICT (name) DO NOTHING";

const LAST_BEAT: &str = "SELECT name, beat_at FROM fleet_heartbeats WHERE name = $1";

/// Moves the heartbeat to `$2` only while it is older than `$3` (compare-and-swap: of the
/// instances coming back after a stop, exactly one sees the gap).
const BEAT_AFTER_GAP: &str =
    "UPDATE fleet_heartbeats SET beat_at = $2 WHERE name = $1 AND beat_at < $3";

const BEAT: &str = "UPDATE fleet_heartbeats SET beat_at = $2 WHERE name = $1 AND beat_at < $2";

/// A page of cursors in connection-id order, after `$1`, `$2` at most (primary key range).
const CURSOR_PAGE: &str = "SELECT connection_id FROM recovery_cursors \
    WHERE connection_id > $1 ORDER BY connection_id LIMIT $2";

/// Makes the cursors in (`$2`, `$3`] due at `$1` unless they already are.
const MARK_RANGE_DUE: &str = "UPDATE recovery_cursors SET due_at = $1 \
    WHERE connection_id > $2 AND connection_id <= $3 AND due_at > $1";

pub(super) const FIND_CURSOR: &str = "SELECT r.connection_id, r.tenant_id, r.event_recovery, \
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

/// Extends a lease `$2` still holds to `$3`.
const EXTEND_LEASE: &str = "UPDATE recovery_cursors SET lease_until = $3 \
    WHERE connection_id = $1 AND lease_owner = $2";

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

/// The oldest cursor of mode `$1` among connections whose events are recovered: the
/// (mode, recovered_through) index walked from its start to the first cursor whose
/// connection is not revoked (usually the first entry).
pub(super) const OLDEST_CURSOR: &str = "SELECT r.recovered_through FROM recovery_cursors r \
    JOIN stripe_connections c ON c.connection_id = r.connection_id \
    WHERE r.mode = $1 AND r.event_recovery = 'on' AND c.status <> 'revoked' \
    ORDER BY r.recovered_through LIMIT 1";

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
    for<'r> (String,): FromRow<'r, DB::Row>,
    for<'r> (String, String): FromRow<'r, DB::Row>,
    for<'r> (OffsetDateTime,): FromRow<'r, DB::Row>,
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
        // Every connection has its cursor from the transaction that saved it, and loses it
        // in the one that deletes it: nothing to reconcile here.
        let statement = DB::claim(CLAIM_DUE_RECOVERIES);
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

    pub(super) async fn extend_recovery_leases(
        &self,
        owner: &str,
        connection_ids: &[String],
        lease_until: OffsetDateTime,
    ) -> Result<(), StoreError> {
        // At most a batch of primary-key updates every third of a lease.
        for connection_id in connection_ids {
            sqlx::query(EXTEND_LEASE)
                .bind(connection_id.as_str())
                .bind(owner)
                .bind(lease_until)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
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
        let mut oldest = Vec::new();
        for mode in [Mode::Live, Mode::Test] {
            let cursor: Option<OffsetDateTime> = sqlx::query_scalar(OLDEST_CURSOR)
                .bind(mode.as_str())
                .fetch_optional(&self.pool)
                .await?;
            oldest.extend(cursor.map(|cursor| (mode, cursor)));
        }
        Ok(oldest)
    }

    pub(super) async fn beat_recovery(
        &self,
        now: OffsetDateTime,
        gap: std::time::Duration,
    ) -> Result<Option<OffsetDateTime>, StoreError> {
        let first = sqlx::query(FIRST_BEAT)
            .bind(HEARTBEAT)
            .bind(now)
            .execute(&self.pool)
            .await?;
        if DB::rows_affected(&first) == 1 {
            // The first start ever: there was no fleet before to have stopped.
            return Ok(None);
        }
        let last: Option<(String, OffsetDateTime)> = sqlx::query_as(LAST_BEAT)
            .bind(HEARTBEAT)
            .fetch_optional(&self.pool)
            .await?;
        if let Some((_, last)) = last.filter(|(_, last)| *last < now - gap) {
            let won = sqlx::query(BEAT_AFTER_GAP)
                .bind(HEARTBEAT)
                .bind(now)
                .bind(now - gap)
                .execute(&self.pool)
                .await?;
            if DB::rows_affected(&won) == 1 {
                return Ok(Some(last));
            }
        }
        sqlx::query(BEAT)
            .bind(HEARTBEAT)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(None)
    }

    pub(super) async fn mark_recoveries_due(
        &self,
        after: &str,
        now: OffsetDateTime,
        limit: i64,
    ) -> Result<Option<(String, u64)>, StoreError> {
        let page: Vec<String> = sqlx::query_scalar(CURSOR_PAGE)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let Some(last) = page.into_iter().last() else {
            return Ok(None);
        };
        let marked = sqlx::query(MARK_RANGE_DUE)
            .bind(now)
            .bind(after)
            .bind(last.as_str())
            .execute(&self.pool)
            .await?;
        Ok(Some((last, DB::rows_affected(&marked))))
    }
}
