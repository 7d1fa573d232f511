//! A scripted SSH client (russh) for what OpenSSH cannot be made to do: floods of channel opens
//! and global requests, a made-up `direct-tcpip` originator, and a tunnel client that records
//! the originator of every `forwarded-tcpip` channel it is given and answers it with that
//! originator as a line of text. Raw SSH on the gateway's port, optionally after a PROXY header.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use russh::client::{self, AuthResult, ChannelOpenHandle, Handle, Msg, Session};
use russh::keys::{load_secret_key, HashAlg, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::Channel;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::ssh::SshKey;

/// What the gateway did to a [`Scripted`] client, as its handler saw it.
#[derive(Debug, Default)]
pub struct Events {
    /// The message of the gateway's SSH_MSG_DISCONNECT, if it sent one.
    pub disconnect: Option<String>,
    /// Every `forwarded-tcpip` channel offered: the originator address and port.
    pub originators: Vec<(String, u32)>,
}

/// The client's handler: trusts any host key, records [`Events`].
pub struct Recorder {
    events: Arc<Mutex<Events>>,
}

impl client::Handler for Recorder {
    type Error = russh::Error;

    async fn check_server_key(&mut self, _key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        _connected_address: &str,
        _connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let origin = (originator_address.to_owned(), originator_port);
        self.events
            .lock()
            .expect("events")
            .originators
            .push(origin.clone());
        reply.accept().await;
        tokio::spawn(async move {
            let mut stream = channel.into_stream();
            let line = format!("origin {}:{}\n", origin.0, origin.1);
            let _ = stream.write_all(line.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        match reason {
            client::DisconnectReason::ReceivedDisconnect(info) => {
                self.events.lock().expect("events").disconnect = Some(info.message);
                Ok(())
            }
            client::DisconnectReason::Error(e) => Err(e),
        }
    }
}

/// A logged-in scripted client.
pub struct Scripted {
    pub handle: Handle<Recorder>,
    /// This client's end of its TCP connection to the gateway.
    pub local: SocketAddr,
    pub events: Arc<Mutex<Events>>,
}

impl Scripted {
    /// Connects to the gateway's `port` as raw SSH, after `proxy_header` if given, and logs in
    /// with `key` as user `tester`; panics if the login fails.
    pub async fn login(port: u16, proxy_header: Option<&str>, key: &SshKey) -> Scripted {
        let mut client = Scripted::connect(port, proxy_header).await;
        let auth = client.try_login(key, Some(HashAlg::Sha512)).await;
        assert!(matches!(auth, AuthResult::Success), "login refused: {auth:?}");
        client
    }

    /// Connects without logging in (see [`Scripted::login`]).
    pub async fn connect(port: u16, proxy_header: Option<&str>) -> Scripted {
        let mut tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to the gateway");
        let local = tcp.local_addr().expect("local address");
        if let Some(header) = proxy_header {
            tcp.write_all(header.as_bytes())
                .await
                .expect("send the PROXY header");
        }
        let events = Arc::new(Mutex::new(Events::default()));
        let recorder = Recorder {
            events: events.clone(),
        };
        let config = Arc::new(client::Config::default());
        let handle = client::connect_stream(config, tcp, recorder)
            .await
            .expect("SSH handshake with the gateway");
        Scripted {
            handle,
            local,
            events,
        }
    }

    /// One publickey login as `tester` with `key`, signing RSA keys with `rsa_hash` (`None`:
    /// `ssh-rsa`, SHA-1); other key types ignore it.
    pub async fn try_login(&mut self, key: &SshKey, rsa_hash: Option<HashAlg>) -> AuthResult {
        let secret = load_secret_key(&key.private, None).expect("load the client key");
        let signer = PrivateKeyWithHashAlg::new(Arc::new(secret), rsa_hash);
        let auth = self.handle.authenticate_publickey("tester", signer).await;
        auth.expect("publickey auth exchange")
    }

    /// The gateway's disconnect message, if any arrived.
    pub fn disconnect_message(&self) -> Option<String> {
        self.events.lock().expect("events").disconnect.clone()
    }

    /// The originators of the `forwarded-tcpip` channels offered so far.
    pub fn originators(&self) -> Vec<(String, u32)> {
        self.events.lock().expect("events").originators.clone()
    }
}
