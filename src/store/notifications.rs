//! The outbox of announcements to Atlas (`crate::notifications`): written in the
//! transaction of the change it announces, claimed under a lease by the deliverer.
//!
//! Order per tenant comes from `notification_tenants`: taking the tenant's next sequence
//! number locks its row until commit, so a tenant's announcements are numbered in commit
//! order, and the deliverer only claims a tenant's lowest pending one.

use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Type};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::dialect::Dialect;
use super::model::ConnectionRecord;
use super::{SqlStore, StoreError};
use crate::clock::now;
use crate::domain::{random_id, ConnectionStatus, TenantId};
use crate::notifications::Announcement;

/// The PostgreSQL channel a committed announcement is signalled on, so every instance's
/// deliverer wakes (the notice is sent at commit, never for a rollback).
pub const CHANNEL: &str = "atlas_stripe_notifications";

/// Where an announcement is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    /// The last attempt of the schedule failed, or Atlas answered 410: waits for a redelivery.
    Failed,
}

impl DeliveryStatus {
    pub const ALL: [Self; 3] = [Self::Pending, Self::Delivered, Self::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

/// An announcement leased to one deliverer for one attempt.
#[derive(Clone, Debug, FromRow)]
pub struct ClaimedAnnouncement {
    pub position: i64,
    /// The Standard Webhooks message id, `msg_…`.
    pub id: String,
    pub tenant_id: String,
    pub body: String,
    /// Attempts made before this one.
    pub attempts: i64,
}

/// An announcement as the ops list shows it.
#[derive(Clone, Debug, FromRow)]
pub struct AnnouncementRecord {
    pub id: String,
    pub tenant_id: String,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: OffsetDateTime,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: OffsetDateTime,
    pub delivered_at: Option<OffsetDateTime>,
}

/// What one attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered {
        status_code: u16,
    },
    /// Try again at `at`.
    Retry {
        status_code: Option<u16>,
        error: String,
        at: OffsetDateTime,
    },
    /// No more attempts until an operator redelivers it.
    Failed {
        status_code: Option<u16>,
        error: String,
    },
}

/// The announcements waiting for delivery, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    pub pending: i64,
    pub oldest_created_at: Option<OffsetDateTime>,
}

/// What the deliverer, the retention worker and the ops routes need of the outbox.
#[async_trait]
pub trait Outbox: Send + Sync {
    /// Records an announcement in a transaction of its own (for the background workers'
    /// events, which change nothing else). Returns its message id.
    async fn record_announcement(&self, announcement: &Announcement) -> Result<String, StoreError>;

    /// Leases up to `limit` due announcements to `owner` until `lease_until`: only the
    /// oldest pending one of each tenant, and none another live deliverer holds.
    async fn claim_announcements(
        &self,
        owner: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<ClaimedAnnouncement>, StoreError>;

    /// Records an attempt's outcome and gives the lease back; a no-op when the lease was
    /// lost meanwhile (another deliverer has it now).
    async fn record_attempt(
        &self,
        position: i64,
        owner: &str,
        outcome: &AttemptOutcome,
    ) -> Result<(), StoreError>;

    /// Newest first: up to `limit` announcements (of `status`, or all) older than the one
    /// with id `after` (`None` for the first page).
    async fn list_announcements(
        &self,
        status: Option<DeliveryStatus>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AnnouncementRecord>, StoreError>;

    /// Makes an announcement pending again, due now, under the same message id; false when
    /// there is no such announcement.
    async fn redeliver_announcement(&self, id: &str) -> Result<bool, StoreError>;

    /// Deletes up to `limit` announcements delivered before `before`; returns how many.
    async fn delete_delivered(&self, before: OffsetDateTime, limit: i64)
        -> Result<u64, StoreError>;

    async fn outbox_backlog(&self) -> Result<Backlog, StoreError>;
}

mod sql {
    pub const NEXT_SEQ: &str =
        "INSERT INTO notification_tenants (tenant_id, seq, connection_status) \
        VALUES ($1, 1, $2) ON CONFLICT (tenant_id) DO UPDATE \
        SET seq = notification_tenants.seq + 1 RETURNING seq";

    pub const SET_STATUS: &str =
        "UPDATE notification_tenants SET connection_status = $2 WHERE tenant_id = $1";

    pub const LAST_STATUS: &str =
        "SELECT connection_status, seq FROM notification_tenants WHERE tenant_id = $1";

    pub const INSERT: &str = "INSERT INTO notifications (id, tenant_id, seq, type, body, \
        status, attempts, next_attempt_at, created_at) \
        VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $6)";

    /// Split around `Dialect::SKIP_LOCKED`. A tenant's later announcements wait while an
    /// earlier one is pending (leased, or waiting for its next attempt).
    pub const CLAIM: [&str; 2] = [
        "UPDATE notifications SET lease_owner = $1, lease_until = $2 \
         WHERE position IN (SELECT n.position FROM notifications n \
         WHERE n.status = 'pending' AND n.next_attempt_at <= $3 \
         AND (n.lease_until IS NULL OR n.lease_until < $3) \
         AND NOT EXISTS (SELECT 1 FROM notifications p WHERE p.tenant_id = n.tenant_id \
         AND p.status = 'pending' AND p.seq < n.seq) \
         ORDER BY n.next_attempt_at, n.position LIMIT $4",
        ") RETURNING position, id, tenant_id, body, attempts",
    ];

    pub const RECORD_ATTEMPT: &str = "UPDATE notifications SET status = $3, \
        attempts = attempts + 1, next_attempt_at = $4, delivered_at = $5, \
        last_status_code = $6, last_error = $7, lease_owner = NULL, lease_until = NULL \
        WHERE position = $1 AND lease_owner = $2";

    pub const LIST: &str = "SELECT id, tenant_id, type, status, attempts, next_attempt_at, \
        last_status_code, last_error, created_at, delivered_at FROM notifications \
        WHERE ($1 IS NULL OR status = $1) \
        AND ($2 IS NULL OR position < (SELECT position FROM notifications WHERE id = $2)) \
        ORDER BY position DESC LIMIT $3";

    pub const REDELIVER: &str = "UPDATE notifications SET status = 'pending', attempts = 0, \
        next_attempt_at = $2, lease_owner = NULL, lease_until = NULL WHERE id = $1";

    pub const DELETE_DELIVERED: &str = "DELETE FROM notifications WHERE position IN \
        (SELECT position FROM notifications WHERE status = 'delivered' AND delivered_at < $1 \
        ORDER BY delivered_at LIMIT $2)";

    pub const BACKLOG: &str = "SELECT COUNT(*), MIN(created_at) FROM notifications \
        WHERE status = 'pending'";
}

/// Wakes this process's deliverers. On SQLite it is sent from inside the writing
/// transaction: the deliverer's claim is a write, so it waits for that transaction to end
/// and then sees what it committed.
static OUTBOX_WRITTEN: LazyLock<watch::Sender<()>> = LazyLock::new(|| watch::channel(()).0);

/// A receiver that sees a change whenever an announcement may have become deliverable.
pub fn outbox_written() -> watch::Receiver<()> {
    OUTBOX_WRITTEN.subscribe()
}

pub(super) fn wake_local() {
    OUTBOX_WRITTEN.send_modify(|()| {});
}

/// Records `announcement` inside the caller's transaction (`conn`): it is delivered if and
/// only if that transaction commits. The other half of issue 22's API is
/// [`Outbox::record_announcement`].
pub async fn record_announcement_in<DB>(
    conn: &mut DB::Connection,
    announcement: &Announcement,
) -> Result<String, StoreError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
{
    let at = now();
    let tenant = announcement.tenant_id.as_str();
    // A tenant first announced by a background event has no status yet: '' until a
    // connection change sets one.
    let (seq,): (i64,) = sqlx::query_as(sql::NEXT_SEQ)
        .bind(tenant)
        .bind("")
        .fetch_one(&mut *conn)
        .await?;
    let id = random_id("msg_", 24);
    sqlx::query(sql::INSERT)
        .bind(id.as_str())
        .bind(tenant)
        .bind(seq)
        .bind(announcement.kind.as_str())
        .bind(announcement.body(at))
        .bind(at)
        .execute(&mut *conn)
        .await?;
    DB::outbox_written(&mut *conn).await?;
    Ok(id)
}

/// The hook of `save_connection`: `connection.connected` or `.replaced`.
pub(super) async fn announce_saved<DB>(
    conn: &mut DB::Connection,
    record: &ConnectionRecord,
    replaced: bool,
) -> Result<(), StoreError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
{
    record_announcement_in::<DB>(conn, &Announcement::saved(record, replaced)).await?;
    set_status::<DB>(conn, &record.tenant_id, record.status.as_str()).await
}

/// The hook of `record_verification`: announces a change of status since the last one
/// announced (`needs_attention`, `revoked`, `restored`); `None` (a stale result) is nothing.
pub(super) async fn announce_verified<DB>(
    conn: &mut DB::Connection,
    record: Option<&ConnectionRecord>,
) -> Result<(), StoreError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> (String, i64): FromRow<'r, DB::Row>,
{
    let Some(record) = record else {
        return Ok(());
    };
    // The caller's update of the connection row holds it: no other change of this tenant
    // runs between this read and the commit.
    let last: Option<(String, i64)> = sqlx::query_as(sql::LAST_STATUS)
        .bind(record.tenant_id.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    let previous = last.and_then(|(status, _)| ConnectionStatus::parse(&status));
    let Some(announcement) = Announcement::verified(record, previous) else {
        return Ok(());
    };
    record_announcement_in::<DB>(conn, &announcement).await?;
    set_status::<DB>(conn, &record.tenant_id, record.status.as_str()).await
}

/// The hook of `delete_connection`: `connection.disconnected`.
pub(super) async fn announce_disconnected<DB>(
    conn: &mut DB::Connection,
    tenant: &TenantId,
    connection_id: &str,
    key_last4: &str,
) -> Result<(), StoreError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
{
    let announcement = Announcement::disconnected(tenant, connection_id, key_last4);
    record_announcement_in::<DB>(conn, &announcement).await?;
    set_status::<DB>(conn, tenant, "").await
}

async fn set_status<DB>(
    conn: &mut DB::Connection,
    tenant: &TenantId,
    status: &str,
) -> Result<(), StoreError>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
{
    sqlx::query(sql::SET_STATUS)
        .bind(tenant.as_str())
        .bind(status)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

#[async_trait]
impl<DB: Dialect> Outbox for SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Type<DB>,
    for<'q> OffsetDateTime: Encode<'q, DB> + Type<DB>,
    for<'q> Option<OffsetDateTime>: Encode<'q, DB> + Type<DB>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> (i64, Option<OffsetDateTime>): FromRow<'r, DB::Row>,
    for<'r> ClaimedAnnouncement: FromRow<'r, DB::Row>,
    for<'r> AnnouncementRecord: FromRow<'r, DB::Row>,
{
    async fn record_announcement(&self, announcement: &Announcement) -> Result<String, StoreError> {
        let mut tx = self.pool().begin().await?;
        let id = record_announcement_in::<DB>(&mut tx, announcement).await?;
        tx.commit().await?;
        wake_local();
        Ok(id)
    }

    async fn claim_announcements(
        &self,
        owner: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<ClaimedAnnouncement>, StoreError> {
        let [head, tail] = sql::CLAIM;
        let statement = [head, DB::SKIP_LOCKED, tail].concat();
        Ok(sqlx::query_as(&statement)
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(limit)
            .fetch_all(self.pool())
            .await?)
    }

    async fn record_attempt(
        &self,
        position: i64,
        owner: &str,
        outcome: &AttemptOutcome,
    ) -> Result<(), StoreError> {
        let at = now();
        let (status, next, delivered, code, error) = match outcome {
            AttemptOutcome::Delivered { status_code } => (
                DeliveryStatus::Delivered,
                at,
                Some(at),
                Some(*status_code),
                None,
            ),
            AttemptOutcome::Retry {
                status_code,
                error,
                at: next,
            } => (
                DeliveryStatus::Pending,
                *next,
                None,
                *status_code,
                Some(error.clone()),
            ),
            AttemptOutcome::Failed { status_code, error } => (
                DeliveryStatus::Failed,
                at,
                None,
                *status_code,
                Some(error.clone()),
            ),
        };
        sqlx::query(sql::RECORD_ATTEMPT)
            .bind(position)
            .bind(owner)
            .bind(status.as_str())
            .bind(next)
            .bind(delivered)
            .bind(code.map(i64::from))
            .bind(error)
            .execute(self.pool())
            .await?;
        // The tenant's next announcement may be deliverable now.
        wake_local();
        Ok(())
    }

    async fn list_announcements(
        &self,
        status: Option<DeliveryStatus>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AnnouncementRecord>, StoreError> {
        Ok(sqlx::query_as(sql::LIST)
            .bind(status.map(DeliveryStatus::as_str))
            .bind(after)
            .bind(limit)
            .fetch_all(self.pool())
            .await?)
    }

    async fn redeliver_announcement(&self, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin().await?;
        let updated = sqlx::query(sql::REDELIVER)
            .bind(id)
            .bind(now())
            .execute(&mut *tx)
            .await?;
        if DB::rows_affected(&updated) == 0 {
            return Ok(false);
        }
        DB::outbox_written(&mut *tx).await?;
        tx.commit().await?;
        wake_local();
        Ok(true)
    }

    async fn delete_delivered(
        &self,
        before: OffsetDateTime,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let deleted = sqlx::query(sql::DELETE_DELIVERED)
            .bind(before)
            .bind(limit)
            .execute(self.pool())
            .await?;
        Ok(DB::rows_affected(&deleted))
    }

    async fn outbox_backlog(&self) -> Result<Backlog, StoreError> {
        let (pending, oldest_created_at): (i64, Option<OffsetDateTime>) =
            sqlx::query_as(sql::BACKLOG).fetch_one(self.pool()).await?;
        Ok(Backlog {
            pending,
            oldest_created_at,
        })
    }
}

/// The application name of the PostgreSQL connection that listens on [`CHANNEL`].
pub const LISTENER_NAME: &str = "atlas-stripe-notification-listener";

/// On PostgreSQL, wakes this process's deliverers whenever any instance commits an
/// announcement; tried again every second while the subscription is lost (the deliverer
/// still polls meanwhile). `None` on SQLite: one process, woken in-process.
pub fn spawn_outbox_listener(
    settings: &crate::config::DatabaseSettings,
    mut stop: watch::Receiver<bool>,
) -> Result<Option<JoinHandle<()>>, StoreError> {
    use secrecy::ExposeSecret;
    let url = settings.url.expose_secret();
    if !super::is_postgres(url) {
        return Ok(None);
    }
    let options = PgConnectOptions::from_str(url)?.application_name(LISTENER_NAME);
    // Its own connection: a subscription never holds one of the pool's.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options);
    Ok(Some(tokio::spawn(async move {
        loop {
            let session = async {
                let mut listener = PgListener::connect_with(&pool).await?;
                listener.listen(CHANNEL).await?;
                // Whatever was committed while unsubscribed is found by this first claim.
                wake_local();
                while listener.try_recv().await?.is_some() {
                    wake_local();
                }
                Ok::<(), sqlx::Error>(())
            };
            tokio::select! {
                ended = session => {
                    if let Err(e) = ended {
                        tracing::warn!(error = %e, "announcement subscription failed; polling meanwhile");
                    }
                }
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
        }
    })))
}
