//! Pure authentication logic: everything `/verify` and the session endpoints decide, with no I/O.
//!
//! Each function here is synchronous and deterministic given its inputs (the clock is passed in),
//! so it is tested exhaustively against the knox vectors without servers.

mod basic;
mod decide;
mod expiry;
mod header;
pub mod owned;
mod policy;
mod token;

pub use basic::{BasicError, LoginCredentials, parse_basic};
pub use decide::{DenyReason, Groups, Outcome, TokenRow, UserInfo, decide, refreshed_expiry};
pub use expiry::{
    ExpiryFormat, format_drf_expiry, format_isoformat, format_login_expiry, parse_isoformat,
};
pub use header::{Credential, parse_authorization};
pub use policy::{Policy, PolicyError, Role, permits};
pub use token::{
    HashAlgorithm, PresentedToken, StoredDigest, TOKEN_KEY_LENGTH, TokenDigest, generate_token,
    token_key_of,
};
