//! The store as the service-token check's source of tokens.

use async_trait::async_trait;

use super::{Store, StoreError};
use crate::auth::{StoredToken, TokenLookup};

#[async_trait]
impl<'a> TokenLookup for dyn Store + 'a {
    type Error = StoreError;

    async fn find_token(&self, id: &str) -> Result<Option<StoredToken>, StoreError> {
        let record = self.find_service_token(id).await?;
        Ok(record.map(|record| StoredToken {
            hash: record.hash,
            scopes: record.scopes,
            revoked: record.revoked_at.is_some(),
        }))
    }
}
