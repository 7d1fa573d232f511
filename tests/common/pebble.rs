//! Pebble, the ACME test server, with `pebble-challtestsrv` as its DNS (every name is 127.0.0.1),
//! each in its own process group and killed on drop; the gateway config that points `[acme]` at
//! it; and handshakes that show what a client trusting Pebble's root is served.
//!
//! Pebble validates on fixed ports written in its config, so ports are picked by binding
//! `127.0.0.1:0` and released just before use; a start that loses that race (a bind fails) is
//! retried with new ports, a bounded number of times.

use std::fmt::Write as _;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::{poll_until, run_bounded, Proc};
use super::{Gateway, TestEnv, DOMAIN, SETUP};

/// Deadline for one issuance (orders usually complete in under 3 s; tests run in parallel).
pub const ISSUE: Duration = Duration::from_secs(60);

const INSTALL_HINT: &str = "apt-get install -y pebble";
const START_ATTEMPTS: usize = 5;

/// Panics with the install line when Pebble is missing: these tests never skip.
pub fn require_pebble() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in ["pebble", "pebble-challtestsrv"] {
        let found = std::env::split_paths(&path).any(|dir| dir.join(tool).is_file());
        assert!(
            found,
            "the ACME tests need `{tool}` on PATH; install it with: {INSTALL_HINT}"
        );
    }
}

/// `n` distinct ports that were free a moment ago (all bound at once, then released), never
/// one this test process handed out before: tests run in parallel, and a replica restarted on
/// its old port must not find another test's gateway there.
pub fn free_ports(n: usize) -> Vec<u16> {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    // Below the kernel's ephemeral range (`ip_local_port_range`, 32768 and up by default), so no
    // socket bound to port 0 elsewhere (another test's gateway, curl's source port) can take
    // one between this check and its use.
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let mut held: Vec<TcpListener> = Vec::new();
    while held.len() < n {
        let port = rand::random_range(10_000..low.max(10_001));
        if handed_out.contains(&port) {
            continue;
        }
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            handed_out.push(port);
            held.push(l);
        }
    }
    held.iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// How the gateway proves control of its names.
#[derive(Clone, Copy, Debug)]
pub enum Challenge {
    TlsAlpn01,
    Http01,
}

/// A running Pebble and its DNS; `stop` (or drop) kills both.
pub struct Pebble {
    /// The ACME directory URL.
    pub directory: String,
    /// The CA of Pebble's API certificate (the gateway's `acme.root_ca`).
    pub api_ca: PathBuf,
    /// Pebble's issuing root: clients trust it to verify issued certificates.
    pub root: PathBuf,
    dir: PathBuf,
    procs: Vec<Proc>,
}

/// Pebble, plus a gateway whose first two listeners are Pebble's `tlsPort` and `httpPort`.
pub struct AcmeSetup {
    pub pebble: Pebble,
    pub gateway: Gateway,
    /// The gateway's config, to start it again on the same state.
    pub config: PathBuf,
}

/// Starts Pebble and an ACME gateway for `gw.test` (`on_demand` as given), retrying with new
/// ports when any of them loses its port to another process.
pub fn start(env: &TestEnv, challenge: Challenge, on_demand: bool) -> AcmeSetup {
    require_pebble();
    let api_ca = api_certificate(env.path());
    for attempt in 0..START_ATTEMPTS {
        let ports = free_ports(6);
        let (gw_tls, gw_http) = (ports[4], ports[5]);
        let Some(pebble) = Pebble::try_start(env.path(), &api_ca, &ports[..4], gw_tls, gw_http) else {
            continue;
        };
        let config = env.path().join(format!("acme-gateway-{attempt}.toml"));
        let toml = gateway_config(env.path(), &pebble, challenge, on_demand, (gw_tls, gw_http));
        fs::write(&config, toml).expect("write gateway config");
        if let Some(gateway) = try_start_gateway(env, &config) {
            return AcmeSetup {
                pebble,
                gateway,
                config,
            };
        }
    }
    panic!("Pebble and the gateway did not start in {START_ATTEMPTS} attempts (ports kept being taken)");
}

/// Starts Pebble alone, validating on 127.0.0.1:`port` (both HTTP-01 and TLS-ALPN-01, for a
/// balancer in front of several gateways), retrying on fresh ports for its own listeners.
pub fn start_validating_on(env: &TestEnv, port: u16) -> Pebble {
    require_pebble();
    let api_ca = api_certificate(env.path());
    for _ in 0..START_ATTEMPTS {
        let ports = free_ports(4);
        if let Some(pebble) = Pebble::try_start(env.path(), &api_ca, &ports, port, port) {
            return pebble;
        }
    }
    panic!("Pebble did not start in {START_ATTEMPTS} attempts (ports kept being taken)");
}

/// Starts the gateway; `None` when it could not bind its fixed ports (the caller retries).
fn try_start_gateway(env: &TestEnv, config: &Path) -> Option<Gateway> {
    match panic::catch_unwind(AssertUnwindSafe(|| Gateway::start(env, config))) {
        Ok(gateway) => Some(gateway),
        Err(_) if read(&config.with_extension("stderr")).contains("cannot bind") => None,
        Err(payload) => panic::resume_unwind(payload),
    }
}

/// The gateway config: the two fixed listeners, ACME state under `DIR/state`, Pebble as the CA.
fn gateway_config(
    dir: &Path,
    pebble: &Pebble,
    challenge: Challenge,
    on_demand: bool,
    ports: (u16, u16),
) -> String {
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let challenge = match challenge {
        Challenge::TlsAlpn01 => "tls-alpn-01",
        Challenge::Http01 => "http-01",
    };
    let mut toml = format!("domain = \"{DOMAIN}\"\n");
    for port in [ports.0, ports.1] {
        let _ = write!(toml, "\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n");
    }
    let _ = write!(
        toml,
        "\n[tls]\ncerts_dir = {}\n\n\
         [ssh]\nkeepalive_interval = \"1s\"\nkeepalive_max = 2\n\n\
         [limits]\nsniff_timeout = \"500ms\"\n\n\
         [acme]\ndirectory = {:?}\nroot_ca = {}\ndomains = [\"{DOMAIN}\"]\n\
         challenge = \"{challenge}\"\ncontact = [\"mailto:ops@{DOMAIN}\"]\non_demand = {on_demand}\n\n\
         [admin]\nbind = \"127.0.0.1:0\"\n",
        q(&dir.join("state")),
        pebble.directory,
        q(&pebble.api_ca),
    );
    toml
}

/// A CA and the certificate (for 127.0.0.1) Pebble's API listens with; returns the CA's path.
fn api_certificate(dir: &Path) -> PathBuf {
    let dir = dir.join("pebble");
    fs::create_dir_all(&dir).expect("create pebble dir");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=pebble api test ca"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(&dir, &ca);
    let mut csr = vec![
        "req",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "api.key",
        "-out",
        "api.csr",
    ];
    csr.extend(ec);
    openssl(&dir, &csr);
    fs::write(dir.join("api.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").expect("write ext");
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "api.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "api.ext",
            "-out",
            "api.pem",
        ],
    );
    dir.join("ca.pem")
}

fn openssl(dir: &Path, args: &[&str]) {
    let mut cmd = Command::new("openssl");
    cmd.args(args).current_dir(dir);
    let out = run_bounded(dir, "openssl", cmd, SETUP);
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        out.combined()
    );
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

impl Pebble {
    /// `ports`: Pebble's API, its management API, the DNS server and the DNS management API.
    /// `None` when a process could not take its port.
    fn try_start(dir: &Path, api_ca: &Path, ports: &[u16], gw_tls: u16, gw_http: u16) -> Option<Pebble> {
        let (api, mgmt, dns, dns_mgmt) = (ports[0], ports[1], ports[2], ports[3]);
        let pebble_dir = dir.join("pebble");
        let mut challtestsrv = Command::new("pebble-challtestsrv");
        challtestsrv.args(["-dns01", &format!("127.0.0.1:{dns}")]);
        challtestsrv.args([
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-defaultIPv6",
            "",
        ]);
        challtestsrv.args(["-management", &format!("127.0.0.1:{dns_mgmt}")]);
        let mut dns_proc = Proc::spawn(dir, "challtestsrv", challtestsrv);
        let listening = poll_until(SETUP, || {
            if dns_proc.try_wait().is_some() {
                return Some(false);
            }
            let up = [dns, dns_mgmt]
                .iter()
                .all(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok());
            up.then_some(true)
        });
        if listening != Some(true) {
            eprintln!("pebble-challtestsrv did not start:\n{}", dns_proc.describe());
            return None;
        }
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{api}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": pebble_dir.join("api.pem"),
            "privateKey": pebble_dir.join("api.key"),
            "httpPort": gw_http,
            "tlsPort": gw_tls,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        let config_path = pebble_dir.join(format!("pebble-{api}.json"));
        fs::write(&config_path, config.to_string()).expect("write pebble config");
        let mut cmd = Command::new("pebble");
        cmd.arg("-config").arg(&config_path);
        cmd.args(["-dnsserver", &format!("127.0.0.1:{dns}")]);
        cmd.env("PEBBLE_VA_NOSLEEP", "1");
        // Every order validates: Pebble would otherwise reuse a valid authorization half the
        // time, and a renewal would then reach no replica at all.
        cmd.env("PEBBLE_AUTHZREUSE", "0");
        let mut pebble_proc = Proc::spawn(dir, "pebble", cmd);
        let root = pebble_dir.join(format!("root-{api}.pem"));
        let roots = format!("https://127.0.0.1:{mgmt}/roots/0");
        let directory = format!("https://127.0.0.1:{api}/dir");
        // Our CA on both of Pebble's listeners proves it is Pebble answering, not a port thief.
        let ready = poll_until(SETUP, || {
            if pebble_proc.try_wait().is_some() {
                return Some(false);
            }
            let ok = curl(dir, api_ca, &directory, None) && curl(dir, api_ca, &roots, Some(&root));
            ok.then_some(true)
        });
        if ready != Some(true) {
            eprintln!("pebble did not start:\n{}", pebble_proc.describe());
            return None;
        }
        Some(Pebble {
            directory,
            api_ca: api_ca.to_owned(),
            root,
            dir: dir.to_owned(),
            procs: vec![dns_proc, pebble_proc],
        })
    }

    /// Orders Pebble has accepted so far (it logs the count of orders after each new one).
    pub fn orders_placed(&self) -> usize {
        self.procs.get(1).map_or(0, |p| {
            let log = format!("{}{}", p.stdout(), p.stderr());
            log.matches("orders in the db").count()
        })
    }

    /// Kills Pebble and its DNS: from now on every ACME request fails.
    pub fn stop(&mut self) {
        self.procs.clear();
    }

    /// A TLS handshake with `sni` on `port`, verified against Pebble's root (and the name):
    /// the certificate served, or why verification failed.
    pub fn handshake(&self, port: u16, sni: &str) -> Result<ServedCert, String> {
        let mut cmd = Command::new("openssl");
        cmd.args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            sni,
        ]);
        cmd.args(["-verify_return_error", "-verify_hostname", sni, "-CAfile"]);
        cmd.arg(&self.root);
        let out = run_bounded(&self.dir, "s_client", cmd, SETUP);
        if !out.status.success() {
            return Err(out.combined());
        }
        ServedCert::from_output(&out.stdout)
    }

    /// Polls until a handshake for `sni` verifies and `accept` likes its certificate.
    pub fn wait_served(&self, port: u16, sni: &str, accept: impl Fn(&ServedCert) -> bool) -> ServedCert {
        let mut last = String::new();
        let served = poll_until(ISSUE, || match self.handshake(port, sni) {
            Ok(cert) if accept(&cert) => Some(cert),
            Ok(cert) => {
                last = format!("{cert:?}");
                None
            }
            Err(e) => {
                last = e;
                None
            }
        });
        served.unwrap_or_else(|| panic!("no wanted certificate for {sni} within {ISSUE:?}; last: {last}"))
    }
}

/// `curl` over HTTPS trusting `ca`; true on success (saving the body to `save` when given).
fn curl(dir: &Path, ca: &Path, url: &str, save: Option<&Path>) -> bool {
    let mut cmd = Command::new("curl");
    cmd.args(["-sf", "--max-time", "5", "--cacert"]).arg(ca);
    cmd.args(["-o"])
        .arg(save.unwrap_or(Path::new("/dev/null")))
        .arg(url);
    run_bounded(dir, "curl", cmd, SETUP).status.success()
}

/// What a handshake was served: the leaf certificate's essentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedCert {
    pub serial: String,
    pub issuer: String,
    pub dns_names: Vec<String>,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
}

impl ServedCert {
    /// Parses the first PEM certificate in `openssl s_client` output.
    pub fn from_output(text: &str) -> Result<ServedCert, String> {
        const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
        const END: &str = "-----END CERTIFICATE-----";
        let start = text
            .find(BEGIN)
            .ok_or_else(|| format!("no certificate in: {text}"))?;
        let end = text[start..].find(END).ok_or("unterminated PEM")? + start + END.len();
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(&text.as_bytes()[start..end]).map_err(|e| e.to_string())?;
        let cert = pem.parse_x509().map_err(|e| e.to_string())?;
        let dns_names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Ok(ServedCert {
            serial: cert.raw_serial_as_string(),
            issuer: cert.issuer().to_string(),
            dns_names,
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// Issued by Pebble (not the gateway's self-signed stand-in).
    pub fn is_pebble(&self) -> bool {
        self.issuer.contains("Pebble Intermediate")
    }
}
