//! `[limits]`: every bound edgemux enforces, with its default and where the number comes from.

use std::time::Duration;

use serde::Deserialize;

use super::Collector;

pub(super) const MAX_CONNECTIONS: usize = 10_000;
/// One address rarely needs more; a NAT of many users can be given more.
pub(super) const MAX_CONNECTIONS_PER_CLIENT: usize = 256;
pub(super) const PRE_ROUTING_TIMEOUT: Duration = Duration::from_secs(10);
/// sslh's default probe timeout is 2 s; SSH clients that wait for the banner pay it once.
pub(super) const SNIFF_TIMEOUT: Duration = Duration::from_secs(2);
pub(super) const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub(super) const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// 64 KiB of request headers, nginx's `large_client_header_buffers` 4 × 8k with room to spare.
pub(super) const MAX_HEADER_BYTES: usize = 64 * 1024;
/// nginx's proxy_read_timeout default.
pub(super) const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
pub(super) const TUNNEL_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// OpenSSH's LoginGraceTime is 120 s; a tunnel client logs in within a second or two.
pub(super) const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// OpenSSH's MaxAuthTries is 6.
pub(super) const SSH_AUTH_ATTEMPTS: usize = 6;
pub(super) const TUNNELS_PER_KEY: usize = 64;
pub(super) const CHANNELS_PER_TUNNEL: usize = 1024;
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// A quarter of a 1 GiB VM: what visitors who do not read may make the gateway hold, in all.
pub(super) const TUNNEL_BUFFER_BUDGET: usize = 256 * 1024 * 1024;
/// An eighth of the budget: at least eight clients are needed to fill it; four 8 MiB windows
/// (`ssh.channel_buffer`) fit in it.
pub(super) const CLIENT_BUFFER_SHARE: usize = 32 * 1024 * 1024;
/// nginx's `send_timeout` default: the time between two successive writes to a client.
pub(super) const WRITE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The smallest budget or share accepted: a few channels' floors (window and buffers).
const MIN_BUFFER_SHARE: usize = 1024 * 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<usize>,
    pub max_connections_per_client: Option<usize>,
    pub pre_routing_timeout: Option<String>,
    pub sniff_timeout: Option<String>,
    pub tls_handshake_timeout: Option<String>,
    pub header_timeout: Option<String>,
    pub max_header_bytes: Option<usize>,
    pub upstream_timeout: Option<String>,
    pub tunnel_open_timeout: Option<String>,
    pub login_timeout: Option<String>,
    pub ssh_auth_attempts: Option<usize>,
    pub tunnels_per_key: Option<usize>,
    pub channels_per_tunnel: Option<usize>,
    pub drain_timeout: Option<String>,
    pub tunnel_buffer_budget: Option<usize>,
    pub client_buffer_share: Option<usize>,
    pub write_idle_timeout: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// Concurrent connections across all listeners.
    pub max_connections: usize,
    /// Concurrent connections from one client address (the real one, after PROXY).
    pub max_connections_per_client: usize,
    /// Everything before routing: PROXY header, sniffing, TLS handshake.
    pub pre_routing_timeout: Duration,
    pub sniff_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// Time a client gets to send a request's headers (slowloris).
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    /// Time a tunnel gets to answer with response headers before the visitor gets 504.
    pub upstream_timeout: Duration,
    /// Time a tunnel client gets to accept a channel before the next pool member is tried.
    pub tunnel_open_timeout: Duration,
    /// Time an SSH client gets to authenticate after routing.
    pub login_timeout: Duration,
    pub ssh_auth_attempts: usize,
    /// Tunnels (forwards) one key may hold across all its connections.
    pub tunnels_per_key: usize,
    /// Concurrent channels into one pool member.
    pub channels_per_tunnel: usize,
    /// How long in-flight work may finish after SIGTERM.
    pub drain_timeout: Duration,
    /// Bytes of tunnel data all channels together may hold for their readers (windows granted
    /// to tunnel clients, and the HTTP buffers behind them).
    pub tunnel_buffer_budget: usize,
    /// The part of the budget one client (an IPv4 address, an IPv6 /64) may hold.
    pub client_buffer_share: usize,
    /// Time a response may wait for its visitor to take the next bytes before it is cut.
    pub write_idle_timeout: Duration,
}

pub(super) fn validate(c: &mut Collector, raw: &RawLimits) -> Limits {
    let mut count = |key: &str, value: Option<usize>, default: usize, min: usize| {
        let v = value.unwrap_or(default);
        if v < min {
            c.push(format!("limits.{key}"), format!("must be at least {min}"));
        }
        v
    };
    let max_connections = count("max_connections", raw.max_connections, MAX_CONNECTIONS, 1);
    let max_connections_per_client = count(
        "max_connections_per_client",
        raw.max_connections_per_client,
        MAX_CONNECTIONS_PER_CLIENT,
        1,
    );
    let max_header_bytes = count("max_header_bytes", raw.max_header_bytes, MAX_HEADER_BYTES, 8192);
    let ssh_auth_attempts = count("ssh_auth_attempts", raw.ssh_auth_attempts, SSH_AUTH_ATTEMPTS, 1);
    let tunnels_per_key = count("tunnels_per_key", raw.tunnels_per_key, TUNNELS_PER_KEY, 1);
    let channels_per_tunnel = count(
        "channels_per_tunnel",
        raw.channels_per_tunnel,
        CHANNELS_PER_TUNNEL,
        1,
    );
    let tunnel_buffer_budget = count(
        "tunnel_buffer_budget",
        raw.tunnel_buffer_budget,
        TUNNEL_BUFFER_BUDGET,
        MIN_BUFFER_SHARE,
    );
    let client_buffer_share = count(
        "client_buffer_share",
        raw.client_buffer_share,
        CLIENT_BUFFER_SHARE.min(tunnel_buffer_budget),
        MIN_BUFFER_SHARE,
    );
    if client_buffer_share > tunnel_buffer_budget {
        c.push(
            "limits.client_buffer_share",
            "must not exceed limits.tunnel_buffer_budget",
        );
    }
    let mut dur = |key: &str, value: &Option<String>, default: Duration| {
        c.duration(&format!("limits.{key}"), value.as_deref(), default)
    };
    Limits {
        max_connections,
        max_connections_per_client,
        pre_routing_timeout: dur(
            "pre_routing_timeout",
            &raw.pre_routing_timeout,
            PRE_ROUTING_TIMEOUT,
        ),
        sniff_timeout: dur("sniff_timeout", &raw.sniff_timeout, SNIFF_TIMEOUT),
        tls_handshake_timeout: dur(
            "tls_handshake_timeout",
            &raw.tls_handshake_timeout,
            TLS_HANDSHAKE_TIMEOUT,
        ),
        header_timeout: dur("header_timeout", &raw.header_timeout, HEADER_TIMEOUT),
        max_header_bytes,
        upstream_timeout: dur("upstream_timeout", &raw.upstream_timeout, UPSTREAM_TIMEOUT),
        tunnel_open_timeout: dur(
            "tunnel_open_timeout",
            &raw.tunnel_open_timeout,
            TUNNEL_OPEN_TIMEOUT,
        ),
        login_timeout: dur("login_timeout", &raw.login_timeout, LOGIN_TIMEOUT),
        ssh_auth_attempts,
        tunnels_per_key,
        channels_per_tunnel,
        drain_timeout: dur("drain_timeout", &raw.drain_timeout, DRAIN_TIMEOUT),
        tunnel_buffer_budget,
        client_buffer_share,
        write_idle_timeout: dur("write_idle_timeout", &raw.write_idle_timeout, WRITE_IDLE_TIMEOUT),
    }
}

/// The limits in force, swapped whole on reload; each connection reads a snapshot
/// (`load_full`), so a reload never changes the bounds of work already under way.
pub type LiveLimits = std::sync::Arc<arc_swap::ArcSwap<Limits>>;
