//! Stream vocabulary shared by every stage, with no protocol logic: who is on the other end
//! ([`ClientAddr`], and [`ClientKey`] when shares are counted), a routed stream of any kind
//! ([`BoxStream`]), bytes read ahead replayed ([`Prefixed`]), bytes counted ([`Counted`]), and
//! a close that lets the peer finish first ([`lingering`]).

mod client_key;
mod counted;
mod linger;
mod prefixed;

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};

pub(crate) use client_key::ClientKey;
pub(crate) use counted::Counted;
pub(crate) use linger::lingering;
pub(crate) use prefixed::Prefixed;

/// A routed stream, whatever stages it went through.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}
pub(crate) type BoxStream = Box<dyn Stream>;

/// Who is on the other end, as the PROXY stage found out: the real client (the TCP peer unless
/// a trusted proxy said otherwise) and the AWS VPC endpoint it came through (PROXY v2 TLV 0xEA).
#[derive(Debug, Clone)]
pub(crate) struct ClientAddr {
    pub(crate) client: SocketAddr,
    pub(crate) vpce: Option<String>,
}
