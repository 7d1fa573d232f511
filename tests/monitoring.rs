//! The operators' monitoring kit under `deploy/`: the alert rules pass `promtool check rules`
//! and their own `promtool test rules` unit tests, the prometheus-operator's PrometheusRule
//! carries the same rules, and every metric the Grafana dashboard queries is exported by a
//! gateway with traffic (the cluster's and ACME's by a cluster with ACME: `tests/cluster/acme.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::config::{Listener, ProxyProtocol};
use common::haproxy::v2_proxy;
use common::http::{http_backend, Visitor};
use common::process::run_bounded;
use common::prom::{
    assert_dashboard_metrics_exist, cluster_or_acme, dashboard_metrics, require_prometheus, Admin,
};
use common::ssh::{KeyKind, Transport};
use common::{TestEnv, SETUP};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

fn yaml(path: &Path) -> serde_norway::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    require_prometheus();
    let env = TestEnv::new();
    let dir = deploy("monitoring");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let mut cmd = Command::new("promtool");
        cmd.current_dir(&dir).args(args);
        let out = run_bounded(env.path(), "promtool", cmd, SETUP);
        assert!(out.status.success(), "promtool {args:?}:\n{}", out.combined());
        println!("promtool {}: {}", args.join(" "), out.stdout.trim());
    }
    // Every alert has a unit test that expects it to fire.
    let tests = std::fs::read_to_string(dir.join("alerts_test.yml")).unwrap();
    let rules = yaml(&dir.join("alerts.yml"));
    let alerts: Vec<&str> = rules["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert_eq!(alerts.len(), 6, "{alerts:?}");
    for alert in alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "no unit test for {alert}"
        );
    }
}

#[test]
fn the_prometheus_rule_carries_the_same_rules() {
    let rules = yaml(&deploy("monitoring/alerts.yml"));
    let operator = yaml(&deploy("kubernetes/monitoring/prometheusrule.yaml"));
    assert_eq!(operator["kind"].as_str(), Some("PrometheusRule"));
    assert_eq!(
        operator["spec"]["groups"], rules["groups"],
        "prometheusrule.yaml differs from alerts.yml"
    );
    let monitor = yaml(&deploy("kubernetes/monitoring/podmonitor.yaml"));
    assert_eq!(monitor["kind"].as_str(), Some("PodMonitor"));
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"].as_str(), Some("admin"));
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
    assert_eq!(
        endpoint["authorization"]["credentials"]["name"].as_str(),
        Some("edgemux-admin-token")
    );
}

#[test]
fn every_metric_the_dashboard_queries_is_exported_by_a_gateway_with_traffic() {
    common::require_tools();
    let env = TestEnv::new();
    let gw = env
        .gateway()
        .listeners(&[
            Listener::local(),
            Listener::local().proxy_protocol(ProxyProtocol::Required, &["127.0.0.1"]),
        ])
        .start();
    // A PROXY v2 header on the second listener, then nothing: a header read, a connection refused.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", gw.ports()[1])).unwrap();
    let header = v2_proxy(
        "192.0.2.7:4000".parse().unwrap(),
        "192.0.2.1:443".parse().unwrap(),
    );
    std::io::Write::write_all(&mut tcp, &header).unwrap();
    drop(tcp);
    let key = env.key("dash", KeyKind::Ed25519);
    let client = gw.ssh(&key, Transport::Tls);
    let _tunnel = client.open_tunnel("app", 80, http_backend("app"));
    let visitor = Visitor::new(&env, &gw);
    visitor
        .get(&key.host("app"), "/", &[])
        .expect_status(200, "through the tunnel");
    visitor
        .get(&key.host("gone"), "/", &[])
        .expect_status(404, "no such tunnel");
    let admin = Admin::new(&gw, None);
    let scrape = common::process::poll_until(SETUP, || {
        let scrape = admin.scrape();
        (scrape.count("edgemux_rejections_total", &[]) > 0.0).then_some(scrape)
    })
    .expect("the refused connection was counted");
    assert_dashboard_metrics_exist(&[&scrape], |n| !cluster_or_acme(n));
}

#[test]
fn the_dashboard_parses_and_queries_edgemux_metrics() {
    let names = dashboard_metrics();
    for wanted in [
        "edgemux_connections_active",
        "edgemux_http_requests_total",
        "edgemux_http_request_duration_seconds",
        "edgemux_tunnels_active",
        "edgemux_bytes_total",
        "edgemux_certificate_expiry_timestamp_seconds",
        "edgemux_acme_orders_total",
        "edgemux_cluster_store_up",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "no panel shows {wanted}: {names:?}"
        );
    }
}
