//! The one clock every stored timestamp comes from.

use time::OffsetDateTime;

/// Now, at microsecond precision (PostgreSQL's), so a timestamp we return equals the one we
/// read back from either backend.
pub fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
        .unwrap_or(now)
}
