//! The peer link between replicas (SCALEOUT §4): a replica that received a visitor for a tunnel
//! held elsewhere opens a stream on the owner replica, which splices it to a channel of its own.
//! Mutually authenticated TLS 1.3 on a private listener, one connection per stream, a signed
//! PROXY v2 header first, a status back, then raw bytes.
//!
//! `secret` loads the cluster secret and derives its keys; `codec` (the header), `status` (the
//! reply) and `replay` (freshness and nonces) are pure; `tls` builds the mutual TLS from the
//! secret; `link` is the async shell: the server, its handler seam, and the client.

pub(crate) mod codec;
pub(crate) mod link;
pub(crate) mod replay;
pub mod secret;
pub(crate) mod status;
pub(crate) mod tls;
