//! The PROXY protocol stage end to end: real HAProxy (`send-proxy`, `send-proxy-v2`) and
//! hand-written v2 headers in front of the gateway. The header's source must reach the HTTP
//! backend (`X-Forwarded-For`, `Forwarded`), the access log and the `forwarded-tcpip` originator;
//! headers from untrusted peers, missing headers where one is required, and headers on a listener
//! that expects none are refused with a log line that says why.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::Duration;

use common::config::{Listener, ProxyProtocol};
use common::haproxy::{v2_local, v2_proxy, Haproxy, SendProxy};
use common::process::{poll_until, run_bounded, Output, Proc};
use common::ssh::{KeyKind, SshKey, Transport};
use common::{Gateway, TestEnv, SETUP};
use rustls::pki_types::ServerName;
use rustls::ClientConnection;

/// The fix the gateway logs when a PROXY header reaches a listener with `proxy_protocol = "off"`.
const OFF_HINT: &str = "enable proxy_protocol on this listener and add the load balancer to trusted_proxies";

/// A gateway whose listener 0 takes no PROXY header (the ssh tunnel clients connect there) and
/// whose listener 1 requires one from 127.0.0.1, where HAProxy and the hand-written headers come
/// from; returns it with the `off` and the `required` ports.
fn start_gateway(env: &TestEnv) -> (Gateway, u16, u16) {
    let gw = env
        .gateway()
        .listeners(&[
            Listener::local().proxy_protocol(ProxyProtocol::Off, &[]),
            Listener::local().proxy_protocol(ProxyProtocol::Required, &["127.0.0.1"]),
        ])
        .start();
    assert_eq!(gw.ports().len(), 2, "one port per configured listener");
    let (off, required) = (gw.ports()[0], gw.ports()[1]);
    (gw, off, required)
}

/// An HTTP/1.1 backend that answers every request with its request head as the body.
fn header_echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(SETUP));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
                    match stream.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n",
                    head.len()
                );
                let _ = stream.write_all(&[answer.as_bytes(), &head].concat());
            });
        }
    });
    port
}

/// `ssh -v -N -R web:80:BACKEND` on the gateway's `off` listener; `-v` makes ssh log the
/// originator of each `forwarded-tcpip` channel. Returns the tunnel's key and its holder.
fn web_tunnel(env: &TestEnv, gw: &Gateway) -> (SshKey, Proc) {
    let key = env.key("web", KeyKind::Ed25519);
    let client = gw.ssh(&key, Transport::Tls);
    let spec = format!("web:80:127.0.0.1:{}", header_echo_server());
    let holder = client.spawn("ssh-R", &["-v", "-N", "-R", &spec], &[]);
    client.wait_tunnel("web", &holder);
    (key, holder)
}

/// `curl https://HOST:PORT/` with the test CA, HOST resolved to 127.0.0.1, plus `extra` options.
fn curl(env: &TestEnv, host: &str, port: u16, extra: &[&str]) -> Output {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "15", "--cacert"])
        .arg(&env.pki.ca)
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
        .args(extra)
        .arg(format!("https://{host}:{port}/"));
    run_bounded(env.path(), "curl", cmd, SETUP)
}

/// The value of header `name` in an echoed request head (names compare case-insensitively).
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

/// Asserts the backend saw `ip` as the client, in both proxy headers.
fn assert_client(head: &str, ip: &str, forwarded_for: &str) {
    assert_eq!(
        header(head, "x-forwarded-for").as_deref(),
        Some(ip),
        "X-Forwarded-For at the backend; request head:\n{head}"
    );
    let forwarded = header(head, "forwarded").unwrap_or_default();
    assert!(
        forwarded.starts_with(&format!("for={forwarded_for};")),
        "Forwarded should start with for={forwarded_for}; request head:\n{head}"
    );
}

/// From 127.0.0.1: writes `header` one byte per TCP segment, then does TLS for `host` and an
/// HTTP/1.1 GET; returns the whole response.
fn get_after_header(env: &TestEnv, port: u16, header: &[u8], host: &str) -> String {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(SETUP)).unwrap();
    for (i, byte) in header.iter().enumerate() {
        let sent = tcp.write_all(&[*byte]).and_then(|()| tcp.flush());
        sent.unwrap_or_else(|e| panic!("gateway closed during the PROXY header, at byte {i}: {e}"));
        // A pause makes each byte its own read at the gateway: this is the point, not a wait.
        thread::sleep(Duration::from_millis(2));
    }
    let sni = ServerName::try_from(host.to_owned()).unwrap();
    let mut conn =
        ClientConnection::new(common::pki::client_config(&env.pki.ca_der, Vec::new()), sni).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("TLS after the PROXY header failed: {e}"));
    let mut response = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            // A peer that closes without close_notify still sent the whole response first.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("reading the response failed after {response:?}: {e}"),
        }
    }
    String::from_utf8_lossy(&response).into_owned()
}

/// A visitor at 127.0.0.5 → HAProxy → the `required` listener → the `web` tunnel.
fn visitor_through_haproxy(send: SendProxy) {
    let env = TestEnv::new();
    let (gw, _, required) = start_gateway(&env);
    let (key, holder) = web_tunnel(&env, &gw);
    let haproxy = Haproxy::start(env.path(), required, send);

    let host = key.host("web");
    let out = curl(&env, &host, haproxy.port, &["--interface", "127.0.0.5"]);
    assert!(out.status.success(), "curl via HAProxy:\n{}", out.combined());
    assert_client(&out.stdout, "127.0.0.5", "127.0.0.5");
    gw.wait_log(&[": request", "client=127.0.0.5:", &host]);
    holder.wait_output("originator 127.0.0.5 port", true, SETUP);
}

#[test]
fn haproxy_send_proxy_v2_carries_the_visitor_address() {
    visitor_through_haproxy(SendProxy::V2);
}

#[test]
fn haproxy_send_proxy_v1_carries_the_visitor_address() {
    visitor_through_haproxy(SendProxy::V1);
}

#[test]
fn header_from_an_untrusted_peer_is_refused() {
    let env = TestEnv::new();
    let (gw, _, required) = start_gateway(&env);
    // curl writes a v1 header naming its own address; 127.0.0.9 is not in trusted_proxies.
    let args = ["--interface", "127.0.0.9", "--haproxy-protocol"];
    let out = curl(&env, "web.gw.test", required, &args);
    out.assert_no_reply("PROXY header from 127.0.0.9");
    gw.wait_log(&["PROXY header from untrusted peer 127.0.0.9"]);
}

#[test]
fn required_mode_refuses_a_trusted_peer_without_a_header() {
    let env = TestEnv::new();
    let (gw, _, required) = start_gateway(&env);
    let out = curl(&env, "web.gw.test", required, &["--interface", "127.0.0.1"]);
    out.assert_no_reply("no PROXY header on a required listener");
    gw.wait_log(&["no PROXY header from trusted peer 127.0.0.1"]);
}

#[test]
fn v2_header_written_one_byte_at_a_time_is_read_whole() {
    let env = TestEnv::new();
    let (gw, _, required) = start_gateway(&env);
    let (key, _holder) = web_tunnel(&env, &gw);
    let source: SocketAddr = "192.0.2.33:5555".parse().unwrap();
    let header = v2_proxy(source, SocketAddr::from(([127, 0, 0, 1], required)));

    let host = key.host("web");
    let response = get_after_header(&env, required, &header, &host);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_client(&response, "192.0.2.33", "192.0.2.33");
    gw.wait_log(&[": request", "client=192.0.2.33:5555", &host]);
}

#[test]
fn v2_local_command_keeps_the_peer_address() {
    let env = TestEnv::new();
    let (gw, _, required) = start_gateway(&env);
    let (key, _holder) = web_tunnel(&env, &gw);

    let response = get_after_header(&env, required, &v2_local(), &key.host("web"));
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_client(&response, "127.0.0.1", "127.0.0.1");
}

#[test]
fn v2_ipv6_client_address_reaches_the_backend() {
    let env = TestEnv::new();
    let (gw, _, required) = start_gateway(&env);
    let (key, holder) = web_tunnel(&env, &gw);
    let source: SocketAddr = "[2001:db8::7]:5555".parse().unwrap();
    let destination: SocketAddr = format!("[::1]:{required}").parse().unwrap();

    let host = key.host("web");
    let response = get_after_header(&env, required, &v2_proxy(source, destination), &host);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_client(&response, "2001:db8::7", "\"[2001:db8::7]\"");
    gw.wait_log(&[": request", "client=[2001:db8::7]:5555", &host]);
    holder.wait_output("originator 2001:db8::7 port 5555", true, SETUP);
}

#[test]
fn header_on_a_listener_with_proxy_protocol_off_is_refused_with_the_fix() {
    let env = TestEnv::new();
    let (gw, off, _) = start_gateway(&env);
    // The usual misconfiguration: the load balancer sends v2, the listener expects none.
    let haproxy = Haproxy::start(env.path(), off, SendProxy::V2);
    let out = curl(&env, "web.gw.test", haproxy.port, &[]);
    out.assert_no_reply("PROXY v2 header on an `off` listener");
    gw.wait_log(&[OFF_HINT]);
}

/// A ProxyCommand that writes a PROXY v2 header (from a file) to the gateway, then relays the
/// ssh client's stdin/stdout: an SSH tunnel client arriving through an NLB, as the gateway sees it.
const RELAY: &str = r#"
import socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(open(sys.argv[2], "rb").read())
def up():
    while True:
        b = sys.stdin.buffer.read1(65536)
        if not b:
            break
        s.sendall(b)
threading.Thread(target=up, daemon=True).start()
while True:
    b = s.recv(65536)
    if not b:
        break
    sys.stdout.buffer.write(b)
    sys.stdout.buffer.flush()
"#;

/// Appends an AWS VPC endpoint TLV (type 0xEA, subtype 0x01) to a v2 header, fixing its length.
fn with_vpce(mut header: Vec<u8>, vpce: &str) -> Vec<u8> {
    let value = [&[0x01u8][..], vpce.as_bytes()].concat();
    header.push(0xEA);
    header.extend(u16::try_from(value.len()).unwrap().to_be_bytes());
    header.extend(value);
    let len = u16::try_from(header.len() - 16).unwrap();
    header[14..16].copy_from_slice(&len.to_be_bytes());
    header
}

#[test]
fn the_vpc_endpoint_of_a_tunnel_client_is_shown_by_the_admin_api() {
    let env = TestEnv::new();
    let (gw, _off, required) = start_gateway(&env);
    let key = SshKey::generate(env.path(), "vpce", KeyKind::Ed25519);
    let source: SocketAddr = "198.51.100.7:51234".parse().unwrap();
    let header = with_vpce(v2_proxy(source, "10.0.0.1:443".parse().unwrap()), "vpce-0abc123");
    let (relay, header_file) = (env.path().join("relay.py"), env.path().join("header.bin"));
    fs::write(&relay, RELAY).unwrap();
    fs::write(&header_file, header).unwrap();
    let proxy = format!(
        "ProxyCommand=python3 {} {required} {}",
        relay.display(),
        header_file.display()
    );
    let mut ssh = Command::new("ssh");
    ssh.args(["-F", "/dev/null", "-i"])
        .arg(&key.private)
        .args(["-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no"])
        .args([
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            &proxy,
        ])
        .args(["-N", "-R", "web:80:127.0.0.1:9", "tester@gw.test"]);
    let _client = Proc::spawn(env.path(), "ssh-vpce", ssh);
    let url = format!("http://127.0.0.1:{}/tunnels", gw.admin_port());
    let shown = poll_until(SETUP, || {
        let mut curl = Command::new("curl");
        curl.args(["-s", "-m", "5", &url]);
        let out = run_bounded(env.path(), "curl-tunnels", curl, SETUP);
        out.stdout.contains("vpce-0abc123").then_some(out.stdout)
    });
    let body = shown.unwrap_or_else(|| panic!("no vpce_id in /tunnels\n{}", gw.stderr()));
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let member = &json["tunnels"][0]["members"][0];
    assert_eq!(member["vpce_id"], "vpce-0abc123", "{json}");
    assert_eq!(
        member["client"],
        source.to_string(),
        "the header's source is the client: {json}"
    );
}
