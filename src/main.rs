//! The edgemux binary: flags, config, tracing, binding; then `edgemux::run`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use edgemux::config::{self, Config};
use edgemux::{Gateway, Listeners};
use tokio_util::sync::CancellationToken;

/// jemalloc with a background thread gives freed memory back to the system within a second
/// (`.cargo/config.toml`); glibc's malloc keeps what a burst of connections took.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "edgemux",
    version,
    about = "One-port edge gateway: TLS, SSH tunnels and HTTPS on one listener"
)]
struct Cli {
    /// Log format on stderr (filter with RUST_LOG, e.g. RUST_LOG=edgemux=debug).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a config: print every problem with its key path; exit 1 if there is any.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Run with the embedded development defaults: domain `localhost`, a generated local CA.
    Dev {
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        #[arg(long, default_value = "certs/dev")]
        certs: PathBuf,
        /// Admin listener; its bearer token is generated once and kept in the certs directory.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
    },
    /// Print the key id that a client's tunnel hosts carry.
    Keyid {
        key: PathBuf,
        /// Print the key's full `SHA256:` fingerprint instead: what `[[ssh.grant]]` and
        /// `[[ssh.reserve]]` name keys by.
        #[arg(long)]
        fingerprint: bool,
    },
    /// Print a new cluster secret for [cluster] secret_file.
    ClusterSecret,
    /// Print the shell completion script for SHELL (the package installs bash, zsh and fish).
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff), generated from these commands and flags.
    Manpage,
    /// Print a ~/.ssh/config block for a gateway, after which a plain
    /// `ssh -R myapp:80:localhost:3000 HOST` reaches it through TLS.
    SshConfig {
        /// The gateway's domain (its certificate's name).
        host: String,
        /// The gateway's public port.
        #[arg(long, default_value_t = 443)]
        port: u16,
        /// Verify the gateway against this CA instead of the system's roots.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Connect to this address instead of HOST (DNS not set up yet, a load balancer's
        /// name); the certificate is still checked against HOST.
        #[arg(long)]
        address: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    raise_open_files_limit();
    let result = match cli.command {
        Command::Serve { config: path } => config::load(&path)
            .with_context(|| format!("invalid config {}", path.display()))
            .and_then(|c| serve(c, Some(path), None)),
        Command::Check { config } => return check(&config),
        Command::Dev { listen, certs, admin } => dev(listen, &certs, admin),
        Command::Keyid { key, fingerprint } => keyid(&key, fingerprint),
        Command::Completions { shell } => {
            let mut cli = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cli, "edgemux", &mut std::io::stdout());
            Ok(())
        }
        Command::Manpage => clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
            .render(&mut std::io::stdout())
            .context("cannot write the manual page"),
        Command::SshConfig {
            host,
            port,
            ca,
            address,
        } => ssh_config(&host, port, ca.as_deref(), address.as_deref()),
        Command::ClusterSecret => edgemux::cluster::peer::secret::generate()
            .map(|secret| println!("{secret}"))
            .context("cannot make a cluster secret"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgemux: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every connection is a file descriptor: lift the soft limit to the hard one (often 1024 → 1M).
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(config) => {
            let secret = config.cluster.as_ref().map(|c| &c.secret_file);
            if let Some(Err(e)) = secret.map(|f| edgemux::cluster::peer::secret::check(f)) {
                eprintln!("{}:\ncluster.secret_file: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}:\n{e}", path.display());
            ExitCode::FAILURE
        }
    }
}

fn keyid(path: &Path, full: bool) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let key = edgemux::ssh::keys::parse_public_key_line(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let fingerprint = edgemux::ssh::keys::fingerprint(&key);
    if full {
        println!("{fingerprint}");
    } else {
        println!("{}", fingerprint.key_id());
    }
    Ok(())
}

fn ssh_config(host: &str, port: u16, ca: Option<&Path>, address: Option<&str>) -> Result<()> {
    use edgemux::client_config::{is_plain_host, is_plain_path, ssh_config, SshTarget};
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    anyhow::ensure!(is_plain_host(&host), "{host:?} is not a host name");
    let address = address.unwrap_or(&host);
    anyhow::ensure!(
        is_plain_host(address),
        "--address {address:?} is not a host name or address"
    );
    let ca = match ca {
        Some(path) => {
            anyhow::ensure!(path.is_file(), "--ca {}: no such file", path.display());
            let path = std::fs::canonicalize(path).with_context(|| format!("--ca {}", path.display()))?;
            let path = path.display().to_string();
            anyhow::ensure!(
                is_plain_path(&path),
                "--ca {path:?}: control characters in the path"
            );
            Some(path)
        }
        None => None,
    };
    // The gateway's SSH host key under a name of its own in known_hosts, apart from any sshd on
    // the same host name.
    let alias = format!("edgemux-{host}");
    print!(
        "{}",
        ssh_config(&SshTarget {
            alias: &host,
            server_name: &host,
            connect: &format!("{address}:{port}"),
            ca: ca.as_deref(),
            host_key_alias: Some(&alias),
        })
    );
    Ok(())
}

/// Called once every listener is bound, with the main listeners' addresses and the admin one's.
type OnReady = Box<dyn FnOnce(&[SocketAddr], Option<SocketAddr>)>;

/// Builds the gateway, binds every listener, reports the bound addresses on stdout, and serves
/// until SIGTERM/SIGINT. SIGHUP reloads certificates and authorized keys.
fn serve(mut config: Config, reload_from: Option<PathBuf>, after_ready: Option<OnReady>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let mut main = Vec::new();
        let mut bound = Vec::new();
        for l in &config.listeners {
            let listener = tokio::net::TcpListener::bind(l.bind)
                .await
                .with_context(|| format!("cannot bind {}", l.bind))?;
            let addr = listener.local_addr()?;
            println!("listening {addr}");
            bound.push(addr);
            main.push(listener);
        }
        // URLs carry the port the first listener really got (it may have been asked for port 0).
        if config.public_port == 0 {
            config.public_port = bound.first().map_or(443, SocketAddr::port);
        }
        let peer = match config.cluster.as_mut() {
            Some(cluster) => {
                let listener = tokio::net::TcpListener::bind(cluster.peer_bind)
                    .await
                    .with_context(|| format!("cannot bind cluster.peer.bind {}", cluster.peer_bind))?;
                let addr = listener.local_addr()?;
                // Asked for port 0: other replicas dial the port really bound.
                if cluster.peer_advertise.port() == 0 {
                    cluster.peer_advertise.set_port(addr.port());
                }
                println!("peer {addr}");
                Some(listener)
            }
            None => None,
        };
        let recorder = edgemux::metrics::install().context("cannot install the metrics recorder")?;
        let gw = Gateway::build(config, Some(recorder))?;
        let admin = match &gw.config().admin {
            Some(a) => {
                let listener = tokio::net::TcpListener::bind(a.bind)
                    .await
                    .with_context(|| format!("cannot bind admin {}", a.bind))?;
                println!("admin {}", listener.local_addr()?);
                Some(listener)
            }
            None => None,
        };
        println!("ready");
        if let Some(f) = after_ready {
            f(&bound, admin.as_ref().and_then(|l| l.local_addr().ok()));
        }
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(gw.clone(), reload_from, shutdown.clone()));
        edgemux::run(gw, Listeners { main, admin, peer }, shutdown).await;
        Ok(())
    })
}

async fn signals(gw: std::sync::Arc<Gateway>, reload_from: Option<PathBuf>, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&gw, reload_from.as_deref()).await,
        }
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}

/// SIGHUP: a new config that does not validate is refused whole, with every problem logged.
async fn reload(gw: &Gateway, path: Option<&Path>) {
    tracing::info!("SIGHUP: reloading");
    let Some(path) = path else {
        return gw.reload(None).await;
    };
    match config::load(path) {
        Ok(new) => gw.reload(Some(&new)).await,
        Err(e) => {
            for line in e.to_string().lines() {
                tracing::error!(
                    problem = line,
                    "new config rejected; the running one stays in force"
                );
            }
        }
    }
}

fn dev(listen: SocketAddr, certs: &Path, admin: SocketAddr) -> Result<()> {
    let files = edgemux::tls::local_ca::ensure_dev_certs(certs)?;
    let token_file = certs.join("admin-token");
    let token = edgemux::secret_file::read_or_create_token(&token_file)
        .with_context(|| format!("cannot make the admin token {}", token_file.display()))?;
    let toml = format!(
        r#"domain = "localhost"
[[listener]]
bind = "{listen}"
[tls]
certs_dir = {dir:?}
local_ca = {{ cert = {ca_cert:?}, key = {ca_key:?} }}
[[tls.certificate]]
cert = {cert:?}
key = {key:?}
[admin]
bind = "{admin}"
token_file = {token_file:?}
"#,
        dir = certs.display().to_string(),
        token_file = token_file.display().to_string(),
        cert = files.leaf.cert.display().to_string(),
        key = files.leaf.key.display().to_string(),
        ca_cert = files.ca.cert.display().to_string(),
        ca_key = files.ca.key.display().to_string(),
    );
    let config = config::parse(&toml).map_err(|p| anyhow::anyhow!("{p:?}"))?;
    let ca = files.ca.cert.display().to_string();
    let token = AdminToken {
        token,
        file: token_file.display().to_string(),
    };
    let help: OnReady = Box::new(move |bound: &[SocketAddr], admin: Option<SocketAddr>| {
        print_dev_help(bound, &ca, admin, &token)
    });
    serve(config, None, Some(help))
}

/// The dev admin listener's bearer token and the file that keeps it.
struct AdminToken {
    token: String,
    file: String,
}

fn print_dev_help(bound: &[SocketAddr], ca: &str, admin: Option<SocketAddr>, token: &AdminToken) {
    let Some(addr) = bound.first() else { return };
    let port = addr.port();
    let keyid = default_key_id().unwrap_or_else(|| "<keyid>".into());
    // TLS (verified against the local CA) authenticates the gateway; the alias keeps its SSH host
    // key apart from any real sshd on localhost in known_hosts.
    let ca_path = std::fs::canonicalize(ca).map_or_else(|_| ca.to_owned(), |p| p.display().to_string());
    let block = edgemux::client_config::ssh_config(&edgemux::client_config::SshTarget {
        alias: "edgemux-dev",
        server_name: "localhost",
        connect: &addr.to_string(),
        ca: Some(&ca_path),
        host_key_alias: Some("edgemux-dev"),
    });
    let ssh = "ssh -R myapp:80:localhost:3000 edgemux-dev";
    let admin = admin.map_or_else(String::new, |admin| {
        let AdminToken { token, file } = token;
        format!(
            "\n3. See your tunnels on the admin API (bearer token {token}, kept in {file}):\n   \
             curl -H \"Authorization: Bearer {token}\" http://{admin}/tunnels\n"
        )
    });
    println!(
        "\nedgemux dev is running on {addr} (TLS + SSH, domain localhost).\n\
         \n1. Add this to ~/.ssh/config:\n\n{block}\n   and expose a local app on port 3000:\n   {ssh}\n\
         \n2. Reach it:\n   curl --cacert {ca} https://myapp-{keyid}.localhost:{port}/\n\
         {admin}\n(the key id of a key: `edgemux keyid ~/.ssh/id_ed25519.pub`)\n"
    );
}

fn default_key_id() -> Option<String> {
    let home = std::env::var_os("HOME")?;
    ["id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"]
        .iter()
        .find_map(|f| {
            let text = std::fs::read_to_string(Path::new(&home).join(".ssh").join(f)).ok()?;
            let key = edgemux::ssh::keys::parse_public_key_line(&text).ok()?;
            Some(edgemux::ssh::keys::key_id(&key))
        })
}
