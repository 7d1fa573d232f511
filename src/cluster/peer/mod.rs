//! The peer link between replicas: mutually authenticated TLS on a private listener, one
//! connection per forwarded stream, a signed PROXY v2 header first.

pub(crate) mod codec;
pub(crate) mod replay;
pub mod secret;
pub(crate) mod status;
