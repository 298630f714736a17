//! Domain types. Everything from outside the process is parsed into one of these at the edge,
//! so the rest of the code never holds a raw `String` where a tenant id or a key is meant.

mod connection;
mod resource;
mod stripe_key;
mod tenant;

pub use connection::{ConnectionStatus, Warning};
pub use resource::{Access, PermissionReport, Resource, UnknownResource};
pub use stripe_key::{KeyFormatError, KeyKind, StripeKey};
pub use tenant::{InvalidMode, InvalidTenantId, Mode, TenantId};

/// A random identifier: `prefix` followed by `len` characters of `[A-Za-z0-9]`.
///
/// `thread_rng` is a CSPRNG (ChaCha, reseeded from the OS), so this also serves for token
/// secrets, without a system call per character as `OsRng` would make.
pub fn random_id(prefix: &str, len: usize) -> String {
    use rand::distributions::{Alphanumeric, DistString};
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    id.push_str(&Alphanumeric.sample_string(&mut rand::thread_rng(), len));
    id
}
