//! Every metric edgemux exports, named and described in one place. Labels are bounded: listener
//! addresses come from the config, everything else from fixed sets; never a host or a key.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS_ACCEPTED: &str = "edgemux_connections_accepted_total";
pub const CONNECTIONS_ROUTED: &str = "edgemux_connections_routed_total";
pub const CONNECTIONS_ACTIVE: &str = "edgemux_connections_active";
pub const CONNECTIONS_MAX: &str = "edgemux_connections_max";
pub const REJECTIONS: &str = "edgemux_rejections_total";
pub const PROXY_HEADERS: &str = "edgemux_proxy_headers_total";
pub const TLS_HANDSHAKES: &str = "edgemux_tls_handshakes_total";
pub const TLS_HANDSHAKE_DURATION: &str = "edgemux_tls_handshake_duration_seconds";
pub const SSH_AUTH: &str = "edgemux_ssh_auth_attempts_total";
pub const TUNNELS_ACTIVE: &str = "edgemux_tunnels_active";
pub const TUNNEL_MEMBERS_ACTIVE: &str = "edgemux_tunnel_members_active";
pub const TUNNEL_REGISTRATIONS: &str = "edgemux_tunnel_registrations_total";
pub const TUNNEL_REMOVALS: &str = "edgemux_tunnel_removals_total";
pub const FORWARDED_CHANNELS: &str = "edgemux_forwarded_channels_total";
pub const ACCESS_REFUSALS: &str = "edgemux_access_refusals_total";
pub const TUNNEL_OPTIONS_REFUSED: &str = "edgemux_tunnel_options_refused_total";
pub const UPSTREAM_REQUESTS: &str = "edgemux_tunnel_upstream_requests_total";
pub const HTTP_REQUESTS: &str = "edgemux_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "edgemux_http_request_duration_seconds";
pub const BYTES: &str = "edgemux_bytes_total";
pub const TUNNEL_BUFFER_RESERVED: &str = "edgemux_tunnel_buffer_reserved_bytes";
pub const RESPONSES_CUT: &str = "edgemux_http_responses_cut_total";
pub const CERT_EXPIRY: &str = "edgemux_certificate_expiry_timestamp_seconds";
pub const ACME_ORDERS: &str = "edgemux_acme_orders_total";
pub const ACME_LOCK_ACQUISITIONS: &str = "edgemux_acme_lock_acquisitions_total";
pub const ACME_LOCKS_HELD: &str = "edgemux_acme_locks_held";
pub const ACME_RENEWALS_DEFERRED: &str = "edgemux_acme_renewals_deferred_total";
pub const ACME_ADOPTED: &str = "edgemux_acme_certificates_adopted_total";
pub const BUILD_INFO: &str = "edgemux_build_info";
pub const CLUSTER_STORE_UP: &str = "edgemux_cluster_store_up";
pub const CLUSTER_LEASE_GRANTS: &str = "edgemux_cluster_lease_grants_total";
pub const CLUSTER_DIRECTORY_ENTRIES: &str = "edgemux_cluster_directory_entries";
pub const CLUSTER_LEASE_RENEWALS: &str = "edgemux_cluster_lease_renewals_total";
pub const CLUSTER_DIRECTORY_HEARD: &str = "edgemux_cluster_directory_heard_timestamp_seconds";
pub const CLUSTER_RESYNCS: &str = "edgemux_cluster_resyncs_total";
pub const CLUSTER_DROPPED_ENTRIES: &str = "edgemux_cluster_dropped_entries_total";
pub const CLUSTER_CONFIG_MISMATCH: &str = "edgemux_cluster_config_mismatch";
pub const CLUSTER_FENCED: &str = "edgemux_cluster_fenced";
pub const CLUSTER_FENCE_ANSWERS: &str = "edgemux_cluster_fence_answers_total";
pub const CLUSTER_DIRECTORY_STALE: &str = "edgemux_cluster_directory_stale";
pub const CLUSTER_PEER_UP: &str = "edgemux_cluster_peer_up";
pub const CLUSTER_PEER_EJECTIONS: &str = "edgemux_cluster_peer_ejections_total";
pub const PEER_AUTH_FAILURES: &str = "edgemux_peer_auth_failures_total";
pub const PEER_STREAMS: &str = "edgemux_peer_streams_total";
pub const PEER_OPEN_DURATION: &str = "edgemux_peer_open_seconds";

/// Latency buckets from 1 ms to 30 s: handshakes and requests through a tunnel.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the process-wide recorder (the one piece of global state) and describes every metric.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS)?
        .install_recorder()?;
    describe();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    zero_event_counters();
    Ok(handle)
}

fn describe() {
    describe_counter!(CONNECTIONS_ACCEPTED, "TCP connections accepted, by listener");
    describe_counter!(
        CONNECTIONS_ROUTED,
        "Connections that reached a service, by listener and route (ssh, http; acme: an answered TLS-ALPN-01 validation)"
    );
    describe_gauge!(
        CONNECTIONS_ACTIVE,
        "Open connections, by route (pending = not routed yet)"
    );
    describe_counter!(
        REJECTIONS,
        "Connections refused before reaching a service, by stage and reason"
    );
    describe_gauge!(
        CONNECTIONS_MAX,
        "limits.max_connections: past it, new connections wait for a free slot"
    );
    describe_counter!(PROXY_HEADERS, "PROXY protocol headers, by version and result");
    describe_counter!(TLS_HANDSHAKES, "TLS handshakes, by result, version and ALPN");
    describe_histogram!(
        TLS_HANDSHAKE_DURATION,
        Unit::Seconds,
        "Time from ClientHello to finished handshake"
    );
    describe_counter!(SSH_AUTH, "SSH public-key authentication attempts, by result");
    describe_gauge!(
        TUNNELS_ACTIVE,
        "Registered tunnels (hosts with at least one member), by kind"
    );
    describe_gauge!(
        TUNNEL_MEMBERS_ACTIVE,
        "SSH connections serving tunnels (pool members), by kind"
    );
    describe_counter!(TUNNEL_REGISTRATIONS, "Tunnel pool members registered, by kind");
    describe_counter!(TUNNEL_REMOVALS, "Tunnel pool members removed, by kind");
    describe_counter!(
        ACCESS_REFUSALS,
        "Requests a tunnel's access rules turned away, by reason (auth, private, allow, rate, \
         forward_auth)"
    );
    describe_counter!(
        UPSTREAM_REQUESTS,
        "Requests sent into tunnels, by the protocol spoken to the app (h1, h2c; passthrough: \
         TLS connections passed through)"
    );
    describe_counter!(
        TUNNEL_OPTIONS_REFUSED,
        "Options lines from the ssh command refused whole (their tunnels are not served)"
    );
    describe_counter!(
        FORWARDED_CHANNELS,
        "forwarded-tcpip channels opened to tunnel clients, by result (opened; refused: limit, \
         visitor_share, budget; failed)"
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests, by method, status class and downstream protocol"
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "Time to response headers, by downstream protocol"
    );
    describe_counter!(
        BYTES,
        Unit::Bytes,
        "Bytes carried, by route and direction (in = from clients)"
    );
    describe_gauge!(
        TUNNEL_BUFFER_RESERVED,
        Unit::Bytes,
        "Bytes of limits.tunnel_buffer_budget held by open channels (their windows and buffers)"
    );
    describe_counter!(
        RESPONSES_CUT,
        "Responses cut because the visitor took nothing for limits.write_idle_timeout, by protocol"
    );
    describe_gauge!(
        CERT_EXPIRY,
        Unit::Seconds,
        "Expiry of each configured certificate, Unix time, by name"
    );
    describe_counter!(ACME_ORDERS, "ACME certificate orders, by result");
    describe_counter!(
        ACME_LOCK_ACQUISITIONS,
        "Attempts to take a name's ACME lock in the cluster store, by result (acquired, busy: another replica orders, error: the store did not answer)"
    );
    describe_gauge!(
        ACME_LOCKS_HELD,
        "ACME locks this replica holds now, by kind (domain: acme.domains, on_demand: tunnel hosts)"
    );
    describe_counter!(
        ACME_RENEWALS_DEFERRED,
        "Renewals not ordered because the cluster store could not grant the lock (retried later)"
    );
    describe_counter!(
        ACME_ADOPTED,
        "Certificates taken from the cluster store that another replica ordered"
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label tells the running build");
    describe_gauge!(
        CLUSTER_STORE_UP,
        "1 while the cluster store serves this replica: it answers the lease keepalives and the \
         directory watch follows it"
    );
    describe_counter!(
        CLUSTER_LEASE_GRANTS,
        "Leases granted to this replica, by reason (start, expired, store_reset); each but the \
         first republishes every local route"
    );
    describe_gauge!(
        CLUSTER_DIRECTORY_ENTRIES,
        "Entries (replica records and routes) in this replica's copy of the cluster directory"
    );
    describe_counter!(
        CLUSTER_LEASE_RENEWALS,
        "Lease keepalives of this replica, by result (ok; failed: the store did not answer in \
         store_timeout; lost: the store no longer knows the lease)"
    );
    describe_gauge!(
        CLUSTER_DIRECTORY_HEARD,
        Unit::Seconds,
        "Unix time the directory watch last heard from the store (an event or the progress notice \
         asked for every keepalive interval): time() minus this is how far the copy may lag"
    );
    describe_counter!(
        CLUSTER_RESYNCS,
        "Full reads of the cluster directory, by reason (start, compacted, gap, reconnect)"
    );
    describe_counter!(
        CLUSTER_DROPPED_ENTRIES,
        "Directory entries not taken, by reason (too_large, bad_key, malformed, key_id_mismatch, \
         not_reserved, over_capacity)"
    );
    describe_gauge!(
        CLUSTER_CONFIG_MISMATCH,
        "1 while another replica (serving or draining) publishes a config hash other than this \
         replica's: domain, public_port, authorized keys, grants, reserves, spread or routing \
         limits differ; the log names the replica"
    );
    describe_gauge!(
        CLUSTER_FENCED,
        "1 while this replica is fenced: the cluster store has not served it for fence_after while \
         another replica's store answered; /readyz answers 503 and SSH clients are told to reconnect"
    );
    describe_counter!(
        CLUSTER_FENCE_ANSWERS,
        "Answers to the pings a replica cut from the store sends before fencing, by answer (up: \
         that peer's store serves it, the evidence to fence; down: a store-wide outage; silent)"
    );
    describe_gauge!(
        CLUSTER_DIRECTORY_STALE,
        "1 while this replica's copy of the directory may be stale because the store does not \
         serve it; lists say \"directory\": \"stale\" and lookups of unknown hosts ask the peers"
    );
    describe_counter!(
        PEER_AUTH_FAILURES,
        "Peer link streams refused as unauthenticated, by reason (tls: the handshake failed, e.g. \
         no client certificate or one from another CA; hmac; clock: a timestamp outside the \
         window; replay: a nonce seen before)"
    );
    describe_gauge!(
        CLUSTER_PEER_UP,
        "Whether another replica can be reached over the peer link (0: ejected after failed \
         dials, until it answers again), by replica name; 0 also for a replica that left the \
         directory"
    );
    describe_counter!(
        CLUSTER_PEER_EJECTIONS,
        "Times another replica was ejected (its members put last) after failed dials, by \
         replica name"
    );
    describe_counter!(
        PEER_STREAMS,
        "Peer link streams, by side (in = served for another replica, out = opened on one) and \
         outcome (ok, or why not)"
    );
    describe_histogram!(
        PEER_OPEN_DURATION,
        Unit::Seconds,
        "Time to open a peer link stream, until the OK status, by side"
    );
}

/// Keeps histograms and summaries fresh without an exporter thread.
pub async fn run_upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

pub fn accepted(listener: &str) {
    counter!(CONNECTIONS_ACCEPTED, "listener" => listener.to_owned()).increment(1);
}

pub fn routed(listener: &str, route: &'static str) {
    counter!(CONNECTIONS_ROUTED, "listener" => listener.to_owned(), "route" => route).increment(1);
}

/// Counts a connection in `route`'s active gauge while alive.
pub struct ActiveGuard(&'static str);

impl ActiveGuard {
    pub fn new(route: &'static str) -> Self {
        gauge!(CONNECTIONS_ACTIVE, "route" => route).increment(1.0);
        Self(route)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        gauge!(CONNECTIONS_ACTIVE, "route" => self.0).decrement(1.0);
    }
}

pub fn rejected(stage: &'static str, reason: &'static str) {
    counter!(REJECTIONS, "stage" => stage, "reason" => reason).increment(1);
}

pub fn proxy_header(version: &'static str, result: &'static str) {
    counter!(PROXY_HEADERS, "version" => version, "result" => result).increment(1);
}

pub fn tls_handshake(result: &'static str, version: &'static str, alpn: &'static str, secs: f64) {
    counter!(TLS_HANDSHAKES, "result" => result, "version" => version, "alpn" => alpn).increment(1);
    if result == "ok" {
        histogram!(TLS_HANDSHAKE_DURATION).record(secs);
    }
}

pub fn ssh_auth(result: &'static str) {
    counter!(SSH_AUTH, "result" => result).increment(1);
}

/// A pool member came or went; `pool_changed` when that created or emptied the pool.
pub fn tunnel_member(kind: &'static str, registered: bool, pool_changed: bool) {
    if registered {
        counter!(TUNNEL_REGISTRATIONS, "kind" => kind).increment(1);
        gauge!(TUNNEL_MEMBERS_ACTIVE, "kind" => kind).increment(1.0);
        if pool_changed {
            gauge!(TUNNELS_ACTIVE, "kind" => kind).increment(1.0);
        }
    } else {
        counter!(TUNNEL_REMOVALS, "kind" => kind).increment(1);
        gauge!(TUNNEL_MEMBERS_ACTIVE, "kind" => kind).decrement(1.0);
        if pool_changed {
            gauge!(TUNNELS_ACTIVE, "kind" => kind).decrement(1.0);
        }
    }
}

pub fn access_refused(reason: &'static str) {
    counter!(ACCESS_REFUSALS, "reason" => reason).increment(1);
}

/// Counters of rare events start at 0 rather than absent, for each of their few label values:
/// a dashboard shows 0 and `rate()` sees the first event.
fn zero_event_counters() {
    for protocol in ["http/1.1", "h2"] {
        counter!(RESPONSES_CUT, "protocol" => protocol).absolute(0);
    }
    for reason in ["auth", "private", "allow", "rate", "forward_auth"] {
        counter!(ACCESS_REFUSALS, "reason" => reason).absolute(0);
    }
    for upstream in ["h1", "h2c", "passthrough"] {
        counter!(UPSTREAM_REQUESTS, "upstream" => upstream).absolute(0);
    }
}

/// With `[cluster]`: the peer link's streams start at 0 on both sides.
pub fn zero_peer_streams() {
    for side in ["in", "out"] {
        counter!(PEER_STREAMS, "side" => side, "outcome" => "ok").absolute(0);
    }
}

pub fn connection_cap(max: usize) {
    gauge!(CONNECTIONS_MAX).set(max as f64);
}

/// `upstream`: `h1`, `h2c` or `passthrough` (`rules::Upstream::label`).
pub fn upstream_request(upstream: &'static str) {
    counter!(UPSTREAM_REQUESTS, "upstream" => upstream).increment(1);
}

pub fn ssh_options_refused() {
    counter!(TUNNEL_OPTIONS_REFUSED).increment(1);
}

pub fn forwarded_channel(result: &'static str) {
    counter!(FORWARDED_CHANNELS, "result" => result).increment(1);
}

/// A bounded method label: the standard methods, else "other".
pub fn method_label(method: &http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "other",
    }
}

pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// `hop`: `local` (served by a member here, or answered here) or `peer` (through another replica).
pub fn http_request(
    method: &http::Method,
    status: u16,
    protocol: &'static str,
    hop: &'static str,
    secs: f64,
) {
    counter!(HTTP_REQUESTS, "method" => method_label(method), "status_class" => status_class(status), "protocol" => protocol, "hop" => hop)
        .increment(1);
    histogram!(HTTP_REQUEST_DURATION, "protocol" => protocol).record(secs);
}

pub fn bytes(route: &'static str, inbound: u64, outbound: u64) {
    counter!(BYTES, "route" => route, "direction" => "in").increment(inbound);
    counter!(BYTES, "route" => route, "direction" => "out").increment(outbound);
}

pub fn tunnel_buffer_reserved(bytes: usize) {
    gauge!(TUNNEL_BUFFER_RESERVED).set(bytes as f64);
}

pub fn response_cut(protocol: &'static str) {
    counter!(RESPONSES_CUT, "protocol" => protocol).increment(1);
}

pub fn cert_expiry(name: &str, unix_secs: i64) {
    gauge!(CERT_EXPIRY, "name" => name.to_owned()).set(unix_secs as f64);
}

/// A certificate no longer renewed (its on-demand tunnel is gone): its expiry becomes NaN, so
/// alerts on expiry never fire for it and dashboards show no value. (The exporter cannot drop a
/// series; a tunnel that comes back sets it again.)
pub fn cert_abandoned(name: &str) {
    gauge!(CERT_EXPIRY, "name" => name.to_owned()).set(f64::NAN);
}

/// Orders start at 0 for each result once ACME is configured, so the first failure is an
/// increase an alert sees.
pub fn zero_acme_orders() {
    for result in ["ok", "failed", "budget"] {
        counter!(ACME_ORDERS, "result" => result).absolute(0);
    }
}

pub fn acme_order(result: &'static str) {
    counter!(ACME_ORDERS, "result" => result).increment(1);
}

pub fn acme_lock(result: &'static str) {
    counter!(ACME_LOCK_ACQUISITIONS, "result" => result).increment(1);
}

/// One more (or one fewer) ACME lock held here; `on_demand` for a tunnel host.
pub fn acme_lock_held(on_demand: bool, held: bool) {
    let kind = if on_demand { "on_demand" } else { "domain" };
    let gauge = gauge!(ACME_LOCKS_HELD, "kind" => kind);
    if held {
        gauge.increment(1.0);
    } else {
        gauge.decrement(1.0);
    }
}

pub fn acme_renewal_deferred() {
    counter!(ACME_RENEWALS_DEFERRED).increment(1);
}

pub fn acme_adopted() {
    counter!(ACME_ADOPTED).increment(1);
}

/// The copy is stale exactly while the store does not serve this replica (the rule the lists
/// follow too), so one call sets both gauges.
pub fn cluster_store_up(up: bool) {
    gauge!(CLUSTER_STORE_UP).set(if up { 1.0 } else { 0.0 });
    gauge!(CLUSTER_DIRECTORY_STALE).set(if up { 0.0 } else { 1.0 });
}

pub fn cluster_lease_grant(reason: &'static str) {
    counter!(CLUSTER_LEASE_GRANTS, "reason" => reason).increment(1);
}

pub fn cluster_directory_entries(entries: usize) {
    gauge!(CLUSTER_DIRECTORY_ENTRIES).set(entries as f64);
}

pub fn cluster_lease_renewal(result: &'static str) {
    counter!(CLUSTER_LEASE_RENEWALS, "result" => result).increment(1);
}

pub fn cluster_directory_heard() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    gauge!(CLUSTER_DIRECTORY_HEARD).set(now);
}

pub fn cluster_resync(reason: &'static str) {
    counter!(CLUSTER_RESYNCS, "reason" => reason).increment(1);
}

pub fn cluster_dropped_entry(reason: &'static str) {
    counter!(CLUSTER_DROPPED_ENTRIES, "reason" => reason).increment(1);
}

pub fn cluster_config_mismatch(mismatch: bool) {
    gauge!(CLUSTER_CONFIG_MISMATCH).set(if mismatch { 1.0 } else { 0.0 });
}

/// `answer`: `up`, `down` or `silent`.
pub fn cluster_fence_answers(answer: &'static str, count: usize) {
    counter!(CLUSTER_FENCE_ANSWERS, "answer" => answer).increment(count as u64);
}

pub fn cluster_fenced(fenced: bool) {
    gauge!(CLUSTER_FENCED).set(if fenced { 1.0 } else { 0.0 });
}

/// `peer` is a replica name (bounded by the fleet), never an incarnation.
pub fn cluster_peer_up(peer: &str, up: bool) {
    gauge!(CLUSTER_PEER_UP, "peer" => peer.to_owned()).set(if up { 1.0 } else { 0.0 });
}

pub fn cluster_peer_ejection(peer: &str) {
    counter!(CLUSTER_PEER_EJECTIONS, "peer" => peer.to_owned()).increment(1);
}

/// A peer link stream refused as unauthenticated; `reason` is tls, hmac, clock or replay.
pub fn peer_auth_failure(reason: &'static str) {
    counter!(PEER_AUTH_FAILURES, "reason" => reason).increment(1);
}

/// A peer link stream ended (`side` in) or was opened or not (`side` out), with its outcome.
pub fn peer_stream(side: &'static str, outcome: &'static str) {
    counter!(PEER_STREAMS, "side" => side, "outcome" => outcome).increment(1);
}

pub fn peer_open(side: &'static str, secs: f64) {
    histogram!(PEER_OPEN_DURATION, "side" => side).record(secs);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(
            method_label(&http::Method::from_bytes(b"BREW").unwrap_or(http::Method::GET)),
            "other"
        );
        assert_eq!(status_class(404), "4xx");
        assert_eq!(status_class(101), "1xx");
        assert_eq!(status_class(999), "5xx");
    }
}
