//! `deploy/kubernetes/`: every YAML document parses; the Service is an internet-facing NLB with
//! PROXY v2 that does not expose the admin port; the Deployment's probes, ports, mounts and
//! security context agree with the edgemux.toml in the ConfigMap, which passes `edgemux check`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Deserialize;
use serde_norway::Value;

use crate::support::{check_passes, deploy, files_with_ext, read, rel};

fn dir() -> PathBuf {
    deploy().join("kubernetes")
}

/// `(file, document)` for every YAML document under deploy/kubernetes.
fn documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    for path in files_with_ext(&dir(), "yaml") {
        let text = read(&path);
        for de in serde_norway::Deserializer::from_str(&text) {
            let doc = Value::deserialize(de).unwrap_or_else(|e| panic!("{}: {e}", rel(&path)));
            docs.push((rel(&path), doc));
        }
    }
    docs
}

fn of_kind(kind: &str) -> Vec<(String, Value)> {
    documents()
        .into_iter()
        .filter(|(_, d)| d["kind"] == kind)
        .collect()
}

fn one(kind: &str) -> Value {
    let mut found = of_kind(kind);
    assert_eq!(found.len(), 1, "want exactly one {kind} under deploy/kubernetes");
    found.remove(0).1
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

/// An edgemux.toml embedded in a ConfigMap, with the files the Deployment mounts beside it.
pub struct Embedded {
    pub origin: String,
    pub toml: String,
    pub provided: Vec<(String, String)>,
}

/// Every `*.toml` key of every ConfigMap; the map's other keys are placed where the Deployments
/// mount that ConfigMap, as the pod would see them.
pub fn embedded_configs() -> Vec<Embedded> {
    let deployments = of_kind("Deployment");
    let mut out = Vec::new();
    for (file, cm) in of_kind("ConfigMap") {
        let name = s(&cm["metadata"]["name"]);
        let data = cm["data"].as_mapping().expect("ConfigMap data");
        let mounts: Vec<String> = deployments
            .iter()
            .flat_map(|(_, d)| config_map_mounts(d, name))
            .collect();
        let mut provided = Vec::new();
        for mount in &mounts {
            for (k, v) in data {
                provided.push((format!("{mount}/{}", s(k)), s(v).to_string()));
            }
        }
        for (k, v) in data.iter().filter(|(k, _)| s(k).ends_with(".toml")) {
            out.push(Embedded {
                origin: format!("{file} (ConfigMap {name}, {})", s(k)),
                toml: s(v).to_string(),
                provided: provided.clone(),
            });
        }
    }
    out
}

/// Mount paths of the container volumes backed by ConfigMap `name`.
fn config_map_mounts(deployment: &Value, name: &str) -> Vec<String> {
    let spec = &deployment["spec"]["template"]["spec"];
    let volumes: Vec<&str> = seq(&spec["volumes"])
        .iter()
        .filter(|v| v["configMap"]["name"] == name)
        .map(|v| s(&v["name"]))
        .collect();
    seq(&spec["containers"])
        .iter()
        .flat_map(|c| seq(&c["volumeMounts"]))
        .filter(|m| volumes.contains(&s(&m["name"])))
        .map(|m| s(&m["mountPath"]).to_string())
        .collect()
}

/// The validated edgemux config of the ConfigMap (`edgemux check` must pass on it).
fn edgemux_config() -> edgemux::config::Config {
    let mut configs = embedded_configs();
    assert_eq!(configs.len(), 1, "one edgemux.toml in the ConfigMaps");
    let e = configs.remove(0);
    check_passes(&e.origin, &e.toml, &e.provided)
}

#[test]
fn manifests_parse_and_kustomization_lists_them_all() {
    let docs = documents();
    assert!(
        docs.iter().all(|(_, d)| d["kind"].is_string()),
        "every document has a kind"
    );
    let kustomization = read(&dir().join("kustomization.yaml"));
    let k: Value = serde_norway::from_str(&kustomization).unwrap();
    let listed: BTreeSet<String> = seq(&k["resources"]).iter().map(|r| s(r).to_string()).collect();
    let present: BTreeSet<String> = files_with_ext(&dir(), "yaml")
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization.yaml resources");
}

#[test]
fn service_is_an_internet_facing_nlb_with_proxy_v2() {
    let svc = one("Service");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    let annotations = &svc["metadata"]["annotations"];
    for (key, want) in [
        ("service.beta.kubernetes.io/aws-load-balancer-type", "external"),
        (
            "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type",
            "ip",
        ),
        ("service.beta.kubernetes.io/aws-load-balancer-proxy-protocol", "*"),
        (
            "service.beta.kubernetes.io/aws-load-balancer-scheme",
            "internet-facing",
        ),
    ] {
        assert_eq!(annotations[key].as_str(), Some(want), "Service annotation {key}");
    }
    let tg = annotations["service.beta.kubernetes.io/aws-load-balancer-target-group-attributes"]
        .as_str()
        .unwrap_or_default();
    assert!(
        tg.split(',')
            .any(|a| a.trim() == "preserve_client_ip.enabled=false"),
        "client IP preservation is off: {tg:?}"
    );
}

/// The container's ports by name.
fn container_ports(container: &Value) -> Vec<(String, u64)> {
    seq(&container["ports"])
        .iter()
        .map(|p| (s(&p["name"]).to_string(), p["containerPort"].as_u64().unwrap()))
        .collect()
}

/// A port given by number or by name.
fn resolve(port: &Value, ports: &[(String, u64)]) -> u64 {
    match port.as_u64() {
        Some(n) => n,
        None => {
            ports
                .iter()
                .find(|(name, _)| name == s(port))
                .unwrap_or_else(|| panic!("no container port named {port:?}"))
                .1
        }
    }
}

#[test]
fn deployment_matches_its_config_and_keeps_admin_private() {
    let cfg = edgemux_config();
    let deployment = one("Deployment");
    let spec = &deployment["spec"];
    assert_eq!(
        spec["replicas"].as_u64(),
        Some(1),
        "one replica: tunnels are per replica"
    );
    assert_eq!(
        spec["strategy"]["type"], "Recreate",
        "never two pods on one volume"
    );
    let pod = &spec["template"]["spec"];
    let containers = seq(&pod["containers"]);
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let ports = container_ports(c);

    // Probes: /healthz and /readyz on the admin listener's port.
    let admin = cfg.admin.clone().expect("an [admin] listener for the probes");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe} path");
        assert_eq!(
            resolve(&get["port"], &ports),
            u64::from(admin.bind.port()),
            "{probe} port"
        );
    }
    assert!(admin.bind.ip().is_unspecified(), "the kubelet probes the pod IP");
    let token = admin
        .token_file
        .clone()
        .expect("admin on the pod IP needs a token_file");
    let secret_mounts = mounts_of(pod, c, "secret");
    assert!(
        secret_mounts.iter().any(|m| token.starts_with(m)),
        "token_file {} is in a Secret mount {secret_mounts:?}",
        token.display()
    );

    // The Service exposes exactly the listeners, never the admin port.
    let svc = one("Service");
    let listener_ports: BTreeSet<u64> = cfg.listeners.iter().map(|l| u64::from(l.bind.port())).collect();
    let mut exposed = BTreeSet::new();
    for p in seq(&svc["spec"]["ports"]) {
        let target = resolve(&p["targetPort"], &ports);
        assert_ne!(
            target,
            u64::from(admin.bind.port()),
            "the Service reaches the admin port: {p:?}"
        );
        assert_ne!(
            p["port"].as_u64(),
            Some(u64::from(admin.bind.port())),
            "Service port {p:?}"
        );
        exposed.insert(target);
    }
    assert_eq!(
        exposed, listener_ports,
        "Service target ports = edgemux listeners"
    );
    let public = seq(&svc["spec"]["ports"])
        .iter()
        .any(|p| p["port"].as_u64() == Some(u64::from(cfg.public_port)));
    assert!(public, "public_port {} is a Service port", cfg.public_port);
    for l in &cfg.listeners {
        assert_eq!(
            l.proxy_protocol,
            edgemux::config::ProxyMode::Required,
            "{} requires PROXY",
            l.bind
        );
        assert!(!l.trusted_proxies.is_empty(), "{} trusts the NLB subnets", l.bind);
    }

    // State on the PVC, config from the ConfigMap at the path `-c` names.
    let pvc = one("PersistentVolumeClaim");
    let pvc_mounts = mounts_of(pod, c, "persistentVolumeClaim");
    assert!(
        pvc_mounts
            .iter()
            .any(|m| cfg.certs_dir == std::path::Path::new(m)),
        "certs_dir on the PVC"
    );
    let claim = seq(&pod["volumes"])
        .iter()
        .find(|v| v["persistentVolumeClaim"].is_mapping())
        .unwrap();
    assert_eq!(
        claim["persistentVolumeClaim"]["claimName"],
        pvc["metadata"]["name"]
    );
    let args: Vec<&str> = seq(&c["args"]).iter().map(s).collect();
    let config_path = args
        .windows(2)
        .find(|w| w[0] == "-c")
        .map(|w| w[1])
        .expect("serve -c FILE");
    assert!(args.contains(&"serve"));
    assert!(
        mounts_of(pod, c, "configMap")
            .iter()
            .any(|m| config_path == format!("{m}/edgemux.toml")),
        "{config_path} comes from the ConfigMap"
    );
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        std::time::Duration::from_secs(grace) > cfg.limits.drain_timeout,
        "grace > drain_timeout"
    );
}

/// Mount paths of the volumes of `kind` (`secret`, `configMap`, `persistentVolumeClaim`).
fn mounts_of(pod: &Value, container: &Value, kind: &str) -> Vec<String> {
    let volumes: Vec<&str> = seq(&pod["volumes"])
        .iter()
        .filter(|v| v[kind].is_mapping())
        .map(|v| s(&v["name"]))
        .collect();
    seq(&container["volumeMounts"])
        .iter()
        .filter(|m| volumes.contains(&s(&m["name"])))
        .map(|m| s(&m["mountPath"]).to_string())
        .collect()
}

#[test]
fn container_runs_non_root_read_only_with_only_net_bind_service() {
    let deployment = one("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let c = &seq(&pod["containers"])[0];
    let sc = &c["securityContext"];
    let non_root = sc["runAsNonRoot"]
        .as_bool()
        .or(pod["securityContext"]["runAsNonRoot"].as_bool());
    assert_eq!(non_root, Some(true), "runAsNonRoot");
    assert_eq!(
        sc["readOnlyRootFilesystem"].as_bool(),
        Some(true),
        "readOnlyRootFilesystem"
    );
    assert_eq!(
        sc["allowPrivilegeEscalation"].as_bool(),
        Some(false),
        "allowPrivilegeEscalation"
    );
    let caps = |k: &str| -> Vec<&str> { seq(&sc["capabilities"][k]).iter().map(s).collect() };
    assert_eq!(caps("drop"), ["ALL"]);
    assert_eq!(caps("add"), ["NET_BIND_SERVICE"]);
    for kind in ["requests", "limits"] {
        assert!(
            c["resources"][kind]["memory"].is_string(),
            "resources.{kind}.memory"
        );
    }
    assert!(
        c["resources"]["requests"]["cpu"].is_string(),
        "resources.requests.cpu"
    );
}

#[test]
fn configmap_authorized_keys_parse() {
    for (file, cm) in of_kind("ConfigMap") {
        if let Some(keys) = cm["data"]["authorized_keys"].as_str() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("authorized_keys");
            std::fs::write(&path, keys).unwrap();
            edgemux::ssh::keys::read_authorized_keys(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }
}
