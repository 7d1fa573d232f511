//! A throwaway test PKI made with the `openssl` CLI in the test's temp dir: one CA and two leaves,
//! `gw.test` + `*.gw.test` (the default certificate) and `other.test` (for SNI tests).
//! Nothing here is ever written outside the temp dir.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A leaf certificate: PEM chain (leaf then CA) and its PKCS#8 key.
pub struct Leaf {
    pub chain: PathBuf,
    pub key: PathBuf,
}

pub struct Pki {
    /// The CA certificate (PEM), for `-CAfile` and rustls roots.
    pub ca: PathBuf,
    /// The same CA in DER, so rustls can trust it without a PEM parser.
    pub ca_der: PathBuf,
    /// SAN `gw.test`, `*.gw.test`.
    pub gw: Leaf,
    /// SAN `other.test`.
    pub other: Leaf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const EC_KEY: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

impl Pki {
    pub fn generate(dir: &Path) -> Pki {
        let dir = dir.join("pki");
        fs::create_dir_all(&dir).expect("create pki dir");
        let mut args = vec!["req", "-x509", "-nodes", "-days", "2"];
        args.extend(EC_KEY);
        args.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=edgemux test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&dir, &args);
        openssl(
            &dir,
            &["x509", "-in", "ca.pem", "-outform", "DER", "-out", "ca.der"],
        );
        let gw = leaf(&dir, "gw", "gw.test", "DNS:gw.test,DNS:*.gw.test", "2");
        let other = leaf(&dir, "other", "other.test", "DNS:other.test", "3");
        Pki {
            ca: dir.join("ca.pem"),
            ca_der: dir.join("ca.der"),
            gw,
            other,
        }
    }
}

/// Issues a leaf from the CA in `dir` (the PKI's `pki/` dir): `NAME.key`, `NAME-fullchain.pem`.
pub fn leaf(dir: &Path, name: &str, cn: &str, san: &str, serial: &str) -> Leaf {
    issue(dir, name, cn, san, serial, "serverAuth")
}

/// A TLS client certificate from the test CA (`extendedKeyUsage=clientAuth`), for listeners that
/// must refuse any CA but their own.
pub fn client_leaf(pki: &Pki, name: &str, serial: &str) -> Leaf {
    let dir = pki.ca.parent().expect("the PKI dir");
    let san = format!("DNS:{name}.test");
    issue(dir, name, &format!("{name}.test"), &san, serial, "clientAuth")
}

fn issue(dir: &Path, name: &str, cn: &str, san: &str, serial: &str, usage: &str) -> Leaf {
    let (key, csr, crt, ext) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.ext"),
    );
    let subject = format!("/CN={cn}");
    let mut args = vec!["req", "-nodes"];
    args.extend(EC_KEY);
    args.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
    openssl(dir, &args);
    let extensions = format!(
        "subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
    );
    fs::write(dir.join(&ext), extensions).expect("write extensions");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            serial,
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
    );
    let mut chain = fs::read(dir.join(&crt)).expect("read leaf");
    chain.extend(fs::read(dir.join("ca.pem")).expect("read ca"));
    let chain_path = dir.join(format!("{name}-fullchain.pem"));
    fs::write(&chain_path, chain).expect("write chain");
    Leaf {
        chain: chain_path,
        key: dir.join(key),
    }
}

/// A rustls client config trusting only the test CA (`ca_der`), offering `alpn`.
pub fn client_config(ca_der: &Path, alpn: Vec<Vec<u8>>) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let der = std::fs::read(ca_der).expect("read CA DER");
    roots
        .add(rustls::pki_types::CertificateDer::from(der))
        .expect("add test CA");
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    std::sync::Arc::new(config)
}

/// A developer's own TLS server, as a passthrough tunnel's app: `openssl s_server -WWW` in `dir`
/// with a certificate for `host` (CN `developer app`) from a CA of its own, not the gateway's,
/// serving `body` as `/body.bin`. Returns the server, its port and the CA to verify it with.
pub fn own_tls_server(dir: &Path, host: &str, body: &[u8]) -> (super::process::Proc, u16, PathBuf) {
    fs::create_dir_all(dir).expect("create the server's dir");
    let pki = Pki::generate(dir);
    let pki_dir = pki.ca.parent().expect("the PKI dir").to_owned();
    let cert = leaf(&pki_dir, "app", "developer app", &format!("DNS:{host}"), "7");
    fs::write(dir.join("body.bin"), body).expect("write body.bin");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir)
        .args(["s_server", "-quiet", "-WWW", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(&cert.chain)
        .arg("-key")
        .arg(&cert.key);
    let server = super::process::Proc::spawn(dir, "s_server", cmd);
    super::process::poll_until(super::SETUP, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .unwrap_or_else(|| panic!("openssl s_server never listened\n{}", server.describe()));
    (server, port, pki.ca)
}
