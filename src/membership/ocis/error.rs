//! How a call to the oCIS API failed, as the resolver and the credentials both report it.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    /// 404: the space or group does not exist (any more).
    #[error("not found ({0})")]
    NotFound(String),
    /// 400/422 and other client errors: oCIS refuses the request as such; retrying will not help.
    #[error("refused with {status} ({detail})")]
    Refused { status: u16, detail: String },
    /// 401 even after refreshing the credentials, or 403.
    #[error("oCIS does not accept our credentials: {0}")]
    Unauthorized(String),
    /// 5xx, timeouts, connection failures (after the retries), or an unreadable answer.
    #[error("oCIS unavailable: {0}")]
    Unavailable(String),
}
