//! The peer link's TLS: 1.3 only, mutual, ALPN `edgemux-peer/1`, and one CA trusted for it and
//! for nothing else.
//!
//! Mode `derived`: the CA's Ed25519 key is derived from the cluster secret (`peer-ca`), so every
//! replica computes the same CA, byte for byte (Ed25519 signatures are deterministic, and the
//! serial and validity are rcgen's fixed defaults). At start each replica issues itself a leaf
//! with a fresh key, named `<rid>.peer.edgemux.invalid`, for both ends of a connection. A dialer
//! checks that the server it reached is the replica it meant: a recycled address that now belongs
//! to another replica fails the handshake. Rotating the secret rotates all of it.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, NameConstraints,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::UnixTime;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::RootCertStore;
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::codec::is_replica_id;
use super::secret::{ClusterSecret, Label};
pub(crate) use crate::config::PeerTlsFiles;

/// The one protocol the peer listener speaks (SCALEOUT §4.2).
pub(crate) const ALPN_PEER: &[u8] = b"edgemux-peer/1";
/// Certificates name replicas under this domain; `.invalid` can never be a real name (RFC 2606).
const PEER_DOMAIN: &str = "peer.edgemux.invalid";
const CA_NAME: &str = "edgemux peer CA";

#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerTlsError {
    #[error("{0:?} is not a replica id (a lowercase DNS name of at most 128 bytes)")]
    ReplicaId(String),
    #[error("cannot derive the peer CA key from the cluster secret")]
    CaKey,
    #[error("cannot make the peer certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("peer TLS set-up failed: {0}")]
    Setup(#[from] rustls::Error),
    #[error("peer TLS verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("cluster.peer.{key} {path}: {reason}")]
    File {
        key: &'static str,
        path: String,
        reason: String,
    },
}

/// What a dialer checks of the name in the owner's certificate.
enum Names {
    /// Derived certificates name their replica: it must be the one dialed.
    Replica,
    /// The operator's certificates name what the operator chose: the chain is checked, not the
    /// name.
    Operator,
}

/// A server certificate verifier that checks the chain to the peer CA (validity, key usage,
/// signatures) and accepts any name in it.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(NotValidForName | NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// This replica's TLS for the peer link: the server side of its listener and the client side of
/// its dials, both with its own leaf and trusting only the cluster CA.
pub(crate) struct PeerTls {
    rid: String,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// Dials that take whichever replica of the cluster answers at an address (the chain is
    /// checked, not the name): a list while the store is down, which must reach a replica
    /// restarted meanwhile under a new id.
    client_any: Arc<ClientConfig>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("rid", &self.rid)
            .finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Mode `derived`: the CA from `secret`, a fresh leaf for replica `rid`.
    pub(crate) fn derived(secret: &ClusterSecret, rid: &str) -> Result<Self, PeerTlsError> {
        let (ca, leaf, key) = issue(secret, rid)?;
        Self::new(rid, (vec![ca], Names::Replica), vec![leaf], key)
    }

    /// Mode `files`: the operator's CA (every certificate in the file is trusted for the peer
    /// link only) and this replica's chain and key. The names in those certificates are the
    /// operator's, so a dialer checks the chain, not that the name is the replica it meant.
    pub(crate) fn from_files(files: &PeerTlsFiles, rid: &str) -> Result<Self, PeerTlsError> {
        use rustls::pki_types::pem::PemObject;
        let certs = |key: &'static str, path: &std::path::Path| {
            let pem = std::fs::read(path).map_err(|e| file_error(key, path, e.to_string()))?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_error(key, path, e.to_string()))?;
            match certs.is_empty() {
                true => Err(file_error(key, path, "no certificate in the file".into())),
                false => Ok(certs),
            }
        };
        let cas = certs("ca", &files.ca)?;
        let chain = certs("cert", &files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| file_error("key", &files.key, e.to_string()))?;
        Self::new(rid, (cas, Names::Operator), chain, key)
    }

    fn new(
        rid: &str,
        (cas, names): (Vec<CertificateDer<'static>>, Names),
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, PeerTlsError> {
        let provider = Arc::new(aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots.add(ca)?;
        }
        let roots = Arc::new(roots);
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        // The peer sends its leaf alone: the other side holds the CA.
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![ALPN_PEER.to_vec()];
        let chain_only = Arc::new(AnyName(
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?,
        ));
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let client = match names {
            Names::Replica => client.with_root_certificates(roots),
            Names::Operator => client
                .dangerous()
                .with_custom_certificate_verifier(chain_only.clone()),
        };
        let mut client = client.with_client_auth_cert(chain.clone(), key.clone_key())?;
        client.alpn_protocols = vec![ALPN_PEER.to_vec()];
        let mut client_any = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(chain_only)
            .with_client_auth_cert(chain, key)?;
        client_any.alpn_protocols = vec![ALPN_PEER.to_vec()];
        Ok(Self {
            rid: rid.to_owned(),
            server: Arc::new(server),
            client: Arc::new(client),
            client_any: Arc::new(client_any),
        })
    }

    /// This replica's id, as its certificate names it.
    pub(crate) fn rid(&self) -> &str {
        &self.rid
    }

    pub(crate) fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    pub(crate) fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// For dials that take any replica of the cluster (see `client_any`).
    pub(crate) fn any_replica_config(&self) -> Arc<ClientConfig> {
        self.client_any.clone()
    }
}

fn file_error(key: &'static str, path: &std::path::Path, reason: String) -> PeerTlsError {
    PeerTlsError::File {
        key,
        path: path.display().to_string(),
        reason,
    }
}

/// The CA derived from `secret`, and a leaf it signs for `rid` with its key.
fn issue(
    secret: &ClusterSecret,
    rid: &str,
) -> Result<
    (
        CertificateDer<'static>,
        CertificateDer<'static>,
        PrivateKeyDer<'static>,
    ),
    PeerTlsError,
> {
    let name = peer_name(rid).ok_or_else(|| PeerTlsError::ReplicaId(rid.to_owned()))?;
    let ca_params = ca_params()?;
    let ca_key = ca_key(&secret.derive(Label::PeerCa))?;
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let mut leaf = CertificateParams::new(vec![name])?;
    leaf.distinguished_name.push(DnType::CommonName, rid);
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf = leaf.signed_by(&leaf_key, &issuer)?;
    let key = PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    Ok((ca.der().clone(), leaf.der().clone(), key))
}

/// `<rid>.peer.edgemux.invalid`: the name in replica `rid`'s certificate.
fn peer_name(rid: &str) -> Option<String> {
    is_replica_id(rid).then(|| format!("{rid}.{PEER_DOMAIN}"))
}

/// The name a dialer gives when any replica will do; no certificate holds it.
pub(crate) fn any_replica_name() -> Option<ServerName<'static>> {
    ServerName::try_from(format!("any.{PEER_DOMAIN}")).ok()
}

/// The name a dialer expects the server to present when it dials replica `rid`.
pub(crate) fn server_name(rid: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(peer_name(rid)?).ok()
}

/// The CA: it may sign only certificates for names under [`PEER_DOMAIN`], one level deep.
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, CA_NAME);
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    ca.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![GeneralSubtree::DnsName(PEER_DOMAIN.into())],
        excluded_subtrees: Vec::new(),
    });
    Ok(ca)
}

/// The Ed25519 CA key whose seed is `seed`, through PKCS#8, which is what rcgen reads.
fn ca_key(seed: &[u8; 32]) -> Result<KeyPair, PeerTlsError> {
    let pair =
        ::aws_lc_rs::signature::Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| PeerTlsError::CaKey)?;
    let pkcs8 = pair.to_pkcs8v1().map_err(|_| PeerTlsError::CaKey)?;
    let der = PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec());
    Ok(KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)?)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    pub(crate) fn secret(byte: u8) -> ClusterSecret {
        ClusterSecret::from_bytes(&[byte; 32]).unwrap()
    }

    /// A replica that trusts `trusting`'s CA but holds a certificate from `signed_by`'s.
    pub(crate) fn impostor(trusting: &ClusterSecret, signed_by: &ClusterSecret, rid: &str) -> PeerTls {
        let (ca, _, _) = issue(trusting, rid).unwrap();
        let (_, leaf, key) = issue(signed_by, rid).unwrap();
        PeerTls::new(rid, (vec![ca], Names::Replica), vec![leaf], key).unwrap()
    }

    /// A handshake over an in-memory pipe: the server's result and the client's, where the
    /// client's counts as failed when its first read fails (TLS 1.3 clients finish before the
    /// server has checked their certificate).
    async fn handshake(server: &PeerTls, client: &PeerTls, dial: &str) -> (bool, bool) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(server.server_config());
        let connector = TlsConnector::from(client.client_config());
        let name = server_name(dial).unwrap();
        let serve = async move {
            let mut tls = acceptor.accept(a).await.ok()?;
            let (_, conn) = tls.get_ref();
            assert_eq!(conn.alpn_protocol(), Some(ALPN_PEER));
            assert_eq!(conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
            tls.write_all(b"x").await.ok()?;
            tls.flush().await.ok()
        };
        let dial = async move {
            let mut tls = connector.connect(name, b).await.ok()?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.ok()
        };
        let (served, dialed) = tokio::join!(serve, dial);
        (served.is_some(), dialed.is_some())
    }

    #[tokio::test]
    async fn replicas_with_the_same_secret_trust_each_other() {
        let r1 = PeerTls::derived(&secret(1), "r1.abc").unwrap();
        let r2 = PeerTls::derived(&secret(1), "r2.def").unwrap();
        assert_eq!(handshake(&r1, &r2, "r1.abc").await, (true, true));
        assert_eq!(handshake(&r2, &r1, "r2.def").await, (true, true));
        assert_eq!(r1.rid(), "r1.abc");
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused_in_the_handshake() {
        let r1 = PeerTls::derived(&secret(1), "r1").unwrap();
        let foreign = PeerTls::derived(&secret(2), "r2").unwrap();
        assert_eq!(
            handshake(&r1, &foreign, "r1").await,
            (false, false),
            "a foreign client"
        );
        assert_eq!(
            handshake(&foreign, &r1, "r2").await,
            (false, false),
            "a foreign server"
        );
        // Trusting our CA does not help a client whose own certificate is from another.
        let impostor = impostor(&secret(1), &secret(2), "r2");
        assert_eq!(
            handshake(&r1, &impostor, "r1").await,
            (false, false),
            "an impostor client"
        );
        assert_eq!(
            handshake(&impostor, &r1, "r2").await,
            (false, false),
            "an impostor server"
        );
    }

    #[tokio::test]
    async fn the_dialer_checks_which_replica_answered() {
        let r1 = PeerTls::derived(&secret(1), "r1").unwrap();
        let r2 = PeerTls::derived(&secret(1), "r2").unwrap();
        let (_, dialed) = handshake(&r1, &r2, "r3").await;
        assert!(!dialed, "r1 answered a dial meant for r3");
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let r1 = PeerTls::derived(&secret(1), "r1").unwrap();
        let mut roots = RootCertStore::empty();
        let ca = ca_params()
            .unwrap()
            .self_signed(&ca_key(&secret(1).derive(Label::PeerCa)).unwrap())
            .unwrap();
        roots.add(ca.der().clone()).unwrap();
        let mut anonymous = ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        anonymous.alpn_protocols = vec![ALPN_PEER.to_vec()];
        let (a, b) = tokio::io::duplex(64 * 1024);
        let serve = TlsAcceptor::from(r1.server_config()).accept(a);
        let dial = async {
            let mut tls = TlsConnector::from(Arc::new(anonymous))
                .connect(server_name("r1").unwrap(), b)
                .await?;
            tls.read_exact(&mut [0u8; 1]).await
        };
        let (served, dialed) = tokio::join!(serve, dial);
        assert!(served.is_err() && dialed.is_err());
    }

    #[test]
    fn every_replica_computes_the_same_ca() {
        let key = |s: u8| ca_key(&secret(s).derive(Label::PeerCa)).unwrap();
        let ca = |s: u8| ca_params().unwrap().self_signed(&key(s)).unwrap().der().to_vec();
        assert_eq!(ca(1), ca(1));
        assert_ne!(ca(1), ca(2));
        let refused = PeerTls::derived(&secret(1), "R1").unwrap_err();
        assert!(matches!(refused, PeerTlsError::ReplicaId(_)));
        assert_eq!(server_name("r1.x").unwrap().to_str(), "r1.x.peer.edgemux.invalid");
    }
}
