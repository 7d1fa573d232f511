//! The TLS stage: TLS 1.2+ only, ALPN `h2`, `http/1.1`, `ssh`. The ClientHello is read first
//! (`read_hello`, rustls's `Acceptor`, its bytes kept) so the SNI and ALPN are known before any
//! certificate is chosen: the composer may pass the bytes on untouched (TLS passthrough), and a
//! pending ACME TLS-ALPN-01 validation is answered instead of a handshake.
//!
//! `certs` parses and tables certificates, `resolver` picks one by SNI and swaps them on reload,
//! `local_ca` mints for allowed hosts, `challenge` holds pending ACME answers. Nothing here knows
//! about tunnels: what may be minted is decided by whoever composes the gateway.

pub(crate) mod certs;
pub(crate) mod challenge;
pub mod local_ca;
pub(crate) mod resolver;

use std::sync::Arc;

use rustls::crypto::aws_lc_rs;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;

use challenge::{Challenges, ACME_TLS_ALPN};
use resolver::CertResolver;

pub(crate) const ALPN_H2: &[u8] = b"h2";
pub(crate) const ALPN_HTTP1: &[u8] = b"http/1.1";
pub(crate) const ALPN_SSH: &[u8] = b"ssh";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("{path} holds no DNS names (subjectAltName)")]
    NoNames { path: String },
    #[error("TLS set-up failed: {0}")]
    Setup(#[from] rustls::Error),
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("acme-tls/1 offered but no ACME challenge is pending")]
    NoChallenge,
}

impl TlsError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Certificate { .. } | Self::NoNames { .. } | Self::Setup(_) => "setup",
            Self::Handshake(_) => "handshake",
            Self::NoChallenge => "no_acme_challenge",
        }
    }
}

/// The one place TLS versions are chosen: 1.3 and 1.2, aws-lc-rs, no client certificates.
fn builder() -> Result<rustls::ConfigBuilder<ServerConfig, rustls::server::WantsServerCert>, TlsError> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    Ok(ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth())
}

/// The server configuration: our ALPN list, certificates from `resolver`.
pub(crate) fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = builder()?.with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_SSH.to_vec()];
    Ok(Arc::new(config))
}

/// What the handshake settled, for routing and the connection span.
#[derive(Debug, Clone, Default)]
pub(crate) struct Negotiated {
    pub(crate) sni: Option<String>,
    pub(crate) alpn: Option<Vec<u8>>,
}

/// What the TLS stage ended with.
pub(crate) enum Accepted<S> {
    Stream(Box<TlsStream<S>>, Negotiated),
    /// An ACME TLS-ALPN-01 validation was answered; the connection is done.
    AcmeChallenge,
}

/// The most ClientHello bytes read before giving up: rustls takes a handshake message of up to
/// 64 KiB, plus the record headers around it.
const MAX_HELLO_BYTES: usize = 64 * 1024 + 1024;
/// How much is read from the socket at once while the ClientHello arrives.
const HELLO_READ: usize = 4 * 1024;

/// A ClientHello read but not answered yet: what it asks for, and every byte it came in, so a
/// connection passed through untouched can replay them.
pub(crate) struct Hello<S> {
    accepted: rustls::server::Accepted,
    raw: Vec<u8>,
    stream: S,
    sni: Option<String>,
    acme: bool,
}

impl<S> Hello<S> {
    pub(crate) fn sni(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    /// It offers ALPN `acme-tls/1`: an ACME validation, never passed through.
    pub(crate) fn offers_acme(&self) -> bool {
        self.acme
    }

    /// The bytes read so far, unanswered, and the stream after them.
    pub(crate) fn into_raw(self) -> (Vec<u8>, S) {
        (self.raw, self.stream)
    }
}

/// Reads the ClientHello with rustls's own parser, keeping the bytes (at most
/// [`MAX_HELLO_BYTES`]). A malformed one is answered with rustls's alert.
pub(crate) async fn read_hello<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
) -> Result<Hello<S>, TlsError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let failed = |e: std::io::Error| {
        crate::metrics::tls_handshake("error", "unknown", "none", 0.0);
        TlsError::Handshake(e)
    };
    let mut acceptor = rustls::server::Acceptor::default();
    let mut raw = Vec::new();
    let mut chunk = vec![0u8; HELLO_READ];
    loop {
        let n = stream.read(&mut chunk).await.map_err(failed)?;
        if n == 0 {
            let eof = std::io::ErrorKind::UnexpectedEof;
            return Err(failed(std::io::Error::new(eof, "closed during the ClientHello")));
        }
        if raw.len() + n > MAX_HELLO_BYTES {
            let e = std::io::Error::new(std::io::ErrorKind::InvalidData, "ClientHello too large");
            return Err(failed(e));
        }
        raw.extend_from_slice(&chunk[..n]);
        let mut fresh = &chunk[..n];
        while !fresh.is_empty() {
            acceptor.read_tls(&mut fresh).map_err(failed)?;
        }
        match acceptor.accept() {
            Ok(None) => {}
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                let sni = hello.server_name().map(str::to_owned);
                let acme = hello
                    .alpn()
                    .is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN));
                return Ok(Hello {
                    accepted,
                    raw,
                    stream,
                    sni,
                    acme,
                });
            }
            Err((e, mut alert)) => {
                let mut out = Vec::new();
                let _ = alert.write_all(&mut out);
                let _ = stream.write_all(&out).await;
                return Err(failed(std::io::Error::new(std::io::ErrorKind::InvalidData, e)));
            }
        }
    }
}

/// Finishes the handshake of `hello`, or answers a pending TLS-ALPN-01 challenge when it offers
/// `acme-tls/1`.
pub(crate) async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    hello: Hello<S>,
    config: Arc<ServerConfig>,
    challenges: &Challenges,
) -> Result<Accepted<S>, TlsError> {
    let Hello {
        accepted,
        raw,
        stream,
        sni,
        acme,
    } = hello;
    // rustls holds what it needs; the copy kept for passthrough is not carried through the
    // handshake.
    drop(raw);
    let start = tokio_rustls::StartHandshake::from_parts(accepted, stream);
    if let (true, Some(name)) = (acme, sni.as_deref()) {
        return answer_challenge(start, challenges, name).await;
    }
    let started = std::time::Instant::now();
    let tls = match start.into_stream(config).await {
        Ok(tls) => tls,
        Err(e) => {
            crate::metrics::tls_handshake("error", "unknown", "none", 0.0);
            return Err(TlsError::Handshake(e));
        }
    };
    let conn = tls.get_ref().1;
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
        _ => "other",
    };
    let alpn_label = match alpn.as_deref() {
        Some(ALPN_H2) => "h2",
        Some(ALPN_HTTP1) => "http/1.1",
        Some(ALPN_SSH) => "ssh",
        _ => "none",
    };
    crate::metrics::tls_handshake("ok", version, alpn_label, started.elapsed().as_secs_f64());
    Ok(Accepted::Stream(Box::new(tls), Negotiated { sni, alpn }))
}

async fn answer_challenge<S: AsyncRead + AsyncWrite + Unpin>(
    start: tokio_rustls::StartHandshake<S>,
    challenges: &Challenges,
    name: &str,
) -> Result<Accepted<S>, TlsError> {
    let Some(config) = challenges.tls_alpn_config_or_fetch(name).await else {
        tracing::info!(
            name,
            "acme-tls/1 offered but no challenge is pending for this name"
        );
        return Err(TlsError::NoChallenge);
    };
    let mut tls = start.into_stream(config).await.map_err(TlsError::Handshake)?;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
    tracing::info!(name, "answered an ACME TLS-ALPN-01 validation");
    Ok(Accepted::AcmeChallenge)
}
