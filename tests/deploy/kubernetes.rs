//! `deploy/kubernetes/`: every YAML document of `base/` parses and the kustomizations list them;
//! the public Service is an internet-facing NLB with PROXY v2 and a `/readyz` health check that
//! exposes neither the admin nor the peer port; the StatefulSet's init container really renders
//! each pod's config (run here with `sh`, its volumes re-rooted into a temp dir) into one that
//! passes `edgemux check`, with the pod's name and IP and a 0600 copy of the cluster secret; the
//! probes, ports, mounts, peer Service, NetworkPolicy and security context agree with that
//! config; `single/` is one replica without `[cluster]`.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;
use serde_norway::Value;

use crate::support::{check_passes, deploy, files_with_ext, read, rel, run, text, which};

fn dir() -> PathBuf {
    deploy().join("kubernetes")
}

fn base() -> PathBuf {
    dir().join("base")
}

/// `(file, document)` for every YAML document of the base (the manifests `kubectl apply -k`
/// applies; `single/` is an overlay on them).
fn documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    for path in files_with_ext(&base(), "yaml") {
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
    assert_eq!(
        found.len(),
        1,
        "want exactly one {kind} under deploy/kubernetes/base"
    );
    found.remove(0).1
}

/// The Service of `type`: `LoadBalancer` (public) or `None`-clusterIP (headless peer Service).
fn service(public: bool) -> Value {
    let mut found: Vec<Value> = of_kind("Service")
        .into_iter()
        .map(|(_, d)| d)
        .filter(|d| (d["spec"]["type"] == "LoadBalancer") == public)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "want one {} Service",
        if public { "public" } else { "other" }
    );
    found.remove(0)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

/// An edgemux config as a pod sees it, with the files its deployment puts beside it.
pub struct Embedded {
    pub origin: String,
    pub toml: String,
    pub provided: Vec<(String, String)>,
}

/// The config each pod runs: what the init container renders (for a pod named `edgemux-0` at
/// 10.1.2.3), with the ConfigMap's other files where the main container mounts them.
pub fn embedded_configs() -> Vec<Embedded> {
    let pod = render_pod("edgemux-0", "10.1.2.3");
    vec![Embedded {
        origin: format!(
            "deploy/kubernetes/base: {} rendered by the init container",
            pod.config_path
        ),
        toml: pod.config,
        provided: pod.provided,
    }]
}

/// The one StatefulSet's pod spec.
fn pod_spec() -> Value {
    one("StatefulSet")["spec"]["template"]["spec"].clone()
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    seq(&pod[list])
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {list} {name}"))
}

/// `(volume name, mountPath)` of a container's mounts.
fn mounts(c: &Value) -> Vec<(String, String)> {
    seq(&c["volumeMounts"])
        .iter()
        .map(|m| (s(&m["name"]).to_string(), s(&m["mountPath"]).to_string()))
        .collect()
}

/// A pod volume (a volumeClaimTemplate's is not one).
fn volume<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    seq(&pod["volumes"]).iter().find(|v| v["name"] == name)
}

/// What the init container left for the main container, and where.
struct RenderedPod {
    config_path: String,
    config: String,
    provided: Vec<(String, String)>,
    /// The secret file render.sh wrote, and the secret the Secret held.
    secret_copy: (u32, String),
    secret: String,
}

/// Runs the StatefulSet's init container as the kubelet would, minus the container: its
/// command with `sh`, its env from the downward API filled in for this pod, and each of its
/// mounts (ConfigMap files, the cluster Secret as 0440 files, an empty dir) re-rooted into a
/// temp dir by rewriting the mount paths in the script.
fn render_pod(pod_name: &str, pod_ip: &str) -> RenderedPod {
    let pod = pod_spec();
    let init = container(&pod, "initContainers", "render");
    let command: Vec<&str> = seq(&init["command"]).iter().map(s).collect();
    assert_eq!(
        command.first(),
        Some(&"/bin/sh"),
        "the init container runs a script"
    );
    for e in seq(&init["env"]) {
        let field = s(&e["valueFrom"]["fieldRef"]["fieldPath"]);
        let want = match s(&e["name"]) {
            "POD_NAME" => "metadata.name",
            "POD_IP" => "status.podIP",
            other => panic!("unexpected env {other}"),
        };
        assert_eq!(field, want, "env {}", s(&e["name"]));
    }
    let cm = one("ConfigMap");
    let data = cm["data"].as_mapping().expect("ConfigMap data");
    let root = tempfile::tempdir().unwrap();
    let under = |p: &str| root.path().join(p.trim_start_matches('/'));
    let secret = edgemux::cluster::peer::secret::generate().unwrap();
    let mut script_path = None;
    let mut init_mounts = mounts(init);
    // Longest mount path first, so that one path's rewrite never eats another's prefix.
    init_mounts.sort_by_key(|(_, p)| std::cmp::Reverse(p.len()));
    for (name, path) in &init_mounts {
        let vol = volume(&pod, name).unwrap_or_else(|| panic!("no volume {name}"));
        std::fs::create_dir_all(under(path)).unwrap();
        if vol["configMap"]["name"] == cm["metadata"]["name"] {
            for (k, v) in data {
                std::fs::write(under(path).join(s(k)), s(v)).unwrap();
            }
            let script = format!("{path}/");
            script_path = command
                .get(1)
                .and_then(|c| c.strip_prefix(&script))
                .map(|f| (path.clone(), f.to_string()));
        } else if vol["secret"]["secretName"] == "edgemux-cluster" {
            for (file, contents) in [
                ("cluster-secret", secret.clone()),
                ("ssh_host_ed25519_key", "host key\n".to_string()),
            ] {
                let target = under(path).join(file);
                std::fs::write(&target, contents).unwrap();
                let mode = vol["secret"]["defaultMode"].as_u64().unwrap() as u32;
                assert_eq!(mode, 0o440, "the Secret as the pod sees it with an fsGroup");
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).unwrap();
            }
        } else {
            assert!(
                vol["emptyDir"].is_mapping(),
                "volume {name}: ConfigMap, the cluster Secret or an emptyDir"
            );
        }
    }
    let (script_dir, script_file) = script_path.expect("the init script comes from the ConfigMap");
    let mut script = read(&under(&script_dir).join(&script_file));
    for (_, path) in &init_mounts {
        script = script.replace(path.as_str(), &under(path).display().to_string());
    }
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(&script)
        .env("POD_NAME", pod_name)
        .env("POD_IP", pod_ip);
    let out = run(sh, Duration::from_secs(20));
    assert!(out.status.success(), "render.sh failed: {}", text(&out.stderr));

    // The main container: `serve -c FILE`, FILE in a volume the init container wrote.
    let main = container(&pod, "containers", "edgemux");
    let args: Vec<&str> = seq(&main["args"]).iter().map(s).collect();
    assert!(args.contains(&"serve"));
    let config_path = args
        .windows(2)
        .find(|w| w[0] == "-c")
        .map(|w| w[1].to_string())
        .expect("serve -c FILE");
    let config = std::fs::read_to_string(under(&config_path))
        .unwrap_or_else(|e| panic!("the init container wrote no {config_path}: {e}"));
    let main_mounts = mounts(main);
    let (run_volume, run_dir) = main_mounts
        .iter()
        .find(|(_, p)| config_path.starts_with(&format!("{p}/")))
        .unwrap_or_else(|| panic!("{config_path} is in none of the main container's mounts"));
    assert!(
        init_mounts.iter().any(|(n, p)| n == run_volume && p == run_dir),
        "{config_path}: the init container writes the volume at the same path"
    );
    let copy = under(run_dir).join("cluster-secret");
    let mode = std::fs::metadata(&copy)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    let copied = std::fs::read_to_string(&copy).unwrap_or_default();
    // The ConfigMap's files where the main container mounts the ConfigMap.
    let mut provided = Vec::new();
    for (name, path) in &main_mounts {
        if volume(&pod, name).is_some_and(|v| v["configMap"]["name"] == cm["metadata"]["name"]) {
            for (k, v) in data {
                provided.push((format!("{path}/{}", s(k)), s(v).to_string()));
            }
        }
    }
    RenderedPod {
        config_path,
        config,
        provided,
        secret_copy: (mode, copied),
        secret,
    }
}

/// The validated config a pod runs (`edgemux check` must pass on it).
fn edgemux_config() -> edgemux::config::Config {
    let mut configs = embedded_configs();
    let e = configs.remove(0);
    check_passes(&e.origin, &e.toml, &e.provided)
}

/// `resources` of a kustomization.yaml.
fn kustomization(dir: &Path) -> Value {
    serde_norway::from_str(&read(&dir.join("kustomization.yaml"))).unwrap()
}

#[test]
fn manifests_parse_and_kustomization_lists_them_all() {
    let docs = documents();
    assert!(
        docs.iter().all(|(_, d)| d["kind"].is_string()),
        "every document has a kind"
    );
    let listed: BTreeSet<String> = seq(&kustomization(&base())["resources"])
        .iter()
        .map(|r| s(r).to_string())
        .collect();
    let present: BTreeSet<String> = files_with_ext(&base(), "yaml")
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "base/kustomization.yaml resources");
    // `kubectl apply -k deploy/kubernetes/` applies the base.
    let top = kustomization(&dir());
    let top: Vec<&str> = seq(&top["resources"]).iter().map(s).collect();
    assert_eq!(top, ["base"], "deploy/kubernetes/kustomization.yaml");
}

#[test]
fn service_is_an_internet_facing_nlb_with_proxy_v2_and_a_readyz_health_check() {
    let cfg = edgemux_config();
    let svc = service(true);
    let annotations = &svc["metadata"]["annotations"];
    let admin_port = cfg.admin.as_ref().expect("[admin]").bind.port().to_string();
    for (key, want) in [
        ("aws-load-balancer-type", "external"),
        ("aws-load-balancer-nlb-target-type", "ip"),
        ("aws-load-balancer-proxy-protocol", "*"),
        ("aws-load-balancer-scheme", "internet-facing"),
        ("aws-load-balancer-healthcheck-protocol", "http"),
        ("aws-load-balancer-healthcheck-path", "/readyz"),
        ("aws-load-balancer-healthcheck-port", admin_port.as_str()),
    ] {
        let key = format!("service.beta.kubernetes.io/{key}");
        assert_eq!(annotations[&key].as_str(), Some(want), "Service annotation {key}");
    }
    let tg: Vec<(String, String)> = annotations
        ["service.beta.kubernetes.io/aws-load-balancer-target-group-attributes"]
        .as_str()
        .unwrap_or_default()
        .split(',')
        .filter_map(|a| a.trim().split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let attr = |k: &str| tg.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    assert_eq!(attr("preserve_client_ip.enabled"), Some("false"), "{tg:?}");
    assert_eq!(
        attr("target_health_state.unhealthy.connection_termination.enabled"),
        Some("false"),
        "a draining pod's connections are not reset: {tg:?}"
    );
    let drain = cfg.limits.drain_timeout.as_secs();
    for key in [
        "deregistration_delay.timeout_seconds",
        "target_health_state.unhealthy.draining_interval_seconds",
    ] {
        let secs: u64 = attr(key)
            .unwrap_or_else(|| panic!("no {key}: {tg:?}"))
            .parse()
            .unwrap();
        assert!(secs > drain, "{key} {secs} must exceed drain_timeout {drain}s");
    }
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
fn init_container_renders_each_pods_config_and_a_private_secret_copy() {
    for (name, ip, advertise) in [
        ("edgemux-0", "10.1.2.3", "10.1.2.3"),
        ("edgemux-2", "fd00:10::7", "[fd00:10::7]"),
    ] {
        let pod = render_pod(name, ip);
        let cfg = check_passes(
            &format!("{} for {name} at {ip}", pod.config_path),
            &pod.config,
            &pod.provided,
        );
        let cluster = cfg.cluster.expect("[cluster]");
        assert_eq!(cluster.replica_name, name, "replica_name is the pod's name");
        let peer_port = cluster.peer_bind.port();
        assert_eq!(
            cluster.peer_advertise.to_string(),
            format!("{advertise}:{peer_port}")
        );
        assert!(cluster.peer_bind.ip().is_unspecified());
        assert_eq!(
            pod.secret_copy,
            (0o600, pod.secret.clone()),
            "render.sh copies the cluster secret, mode 0600"
        );
        let run_dir = Path::new(&pod.config_path).parent().unwrap();
        assert_eq!(cluster.secret_file, run_dir.join("cluster-secret"));
        assert_eq!(cfg.ssh.host_key, run_dir.join("ssh_host_ed25519_key"));
        assert!(
            cfg.acme.is_none() && !cfg.certificates.is_empty(),
            "several replicas serve certificates from files: an ACME validation reaches any replica"
        );
    }
}

#[test]
fn statefulset_matches_its_config_and_keeps_admin_and_peer_private() {
    let cfg = edgemux_config();
    let cluster = cfg.cluster.clone().expect("the base runs several replicas");
    let sts = one("StatefulSet");
    let spec = &sts["spec"];
    assert_eq!(spec["replicas"].as_u64(), Some(3), "three replicas");
    let pod = &spec["template"]["spec"];
    let c = container(pod, "containers", "edgemux");
    let ports = container_ports(c);
    let port = |name: &str| ports.iter().find(|(n, _)| n == name).map(|(_, p)| *p);

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
    for cert in &cfg.certificates {
        assert!(
            secret_mounts
                .iter()
                .any(|m| cert.cert.starts_with(m) && cert.key.starts_with(m)),
            "certificate {} is in a Secret mount",
            cert.cert.display()
        );
    }

    // The public Service exposes exactly the listeners: never the admin or the peer port.
    let peer = u64::from(cluster.peer_bind.port());
    assert_eq!(port("peer"), Some(peer), "container port peer = peer.bind's port");
    let svc = service(true);
    let listener_ports: BTreeSet<u64> = cfg.listeners.iter().map(|l| u64::from(l.bind.port())).collect();
    let mut exposed = BTreeSet::new();
    for p in seq(&svc["spec"]["ports"]) {
        let target = resolve(&p["targetPort"], &ports);
        for private in [u64::from(admin.bind.port()), peer] {
            assert_ne!(
                target, private,
                "the public Service reaches port {private}: {p:?}"
            );
            assert_ne!(p["port"].as_u64(), Some(private), "public Service port {p:?}");
        }
        exposed.insert(target);
    }
    assert_eq!(
        exposed, listener_ports,
        "public Service target ports = edgemux listeners"
    );
    assert!(
        seq(&svc["spec"]["ports"])
            .iter()
            .any(|p| p["port"].as_u64() == Some(u64::from(cfg.public_port))),
        "public_port {} is a Service port",
        cfg.public_port
    );
    for l in &cfg.listeners {
        assert_eq!(
            l.proxy_protocol,
            edgemux::config::ProxyMode::Required,
            "{} requires PROXY",
            l.bind
        );
        assert!(!l.trusted_proxies.is_empty(), "{} trusts the NLB subnets", l.bind);
    }

    // The headless peer Service governs the pod names (the replica names) and carries the peer
    // port only.
    let headless = service(false);
    assert_eq!(
        headless["spec"]["clusterIP"], "None",
        "the peer Service is headless"
    );
    assert_eq!(spec["serviceName"], headless["metadata"]["name"]);
    assert_eq!(
        headless["spec"]["selector"],
        sts["spec"]["selector"]["matchLabels"]
    );
    let peer_ports: Vec<u64> = seq(&headless["spec"]["ports"])
        .iter()
        .map(|p| resolve(&p["targetPort"], &ports))
        .collect();
    assert_eq!(peer_ports, [peer], "the peer Service carries the peer port only");

    // The NetworkPolicy admits the peer port from the edgemux pods only.
    let np = one("NetworkPolicy");
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"],
        sts["spec"]["selector"]["matchLabels"]
    );
    for rule in seq(&np["spec"]["ingress"]) {
        let rule_ports: Vec<u64> = seq(&rule["ports"])
            .iter()
            .map(|p| resolve(&p["port"], &ports))
            .collect();
        assert!(!rule_ports.is_empty(), "every rule names its ports: {rule:?}");
        if rule_ports.contains(&peer) {
            assert_eq!(rule_ports, [peer], "the peer port has a rule of its own");
            let from = seq(&rule["from"]);
            assert!(
                !from.is_empty()
                    && from.iter().all(|f| f["podSelector"]["matchLabels"]
                        == sts["spec"]["selector"]["matchLabels"]
                        && !f["ipBlock"].is_mapping()
                        && !f["namespaceSelector"].is_mapping()),
                "peer port from the edgemux pods only: {rule:?}"
            );
        }
    }
    let pdb = one("PodDisruptionBudget");
    assert_eq!(pdb["spec"]["selector"], sts["spec"]["selector"]);
    assert_eq!(pdb["spec"]["maxUnavailable"].as_u64(), Some(1));

    // State: one volume per pod for certs_dir.
    let claims: Vec<&str> = seq(&spec["volumeClaimTemplates"])
        .iter()
        .map(|v| s(&v["metadata"]["name"]))
        .collect();
    let state_mount = mounts(c)
        .into_iter()
        .find(|(_, p)| cfg.certs_dir == Path::new(p))
        .expect("certs_dir is a mount");
    assert!(
        claims.contains(&state_mount.0.as_str()),
        "certs_dir on a volumeClaimTemplate"
    );

    // Shutdown: the preStop pause, then the drain, within the grace period.
    let pause: u64 = seq(&c["lifecycle"]["preStop"]["exec"]["command"])
        .iter()
        .map(s)
        .collect::<Vec<_>>()
        .as_slice()
        .split_first()
        .filter(|(cmd, _)| **cmd == "sleep")
        .and_then(|(_, args)| args.first()?.parse().ok())
        .expect("preStop: sleep N");
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(grace) > Duration::from_secs(pause) + cfg.limits.drain_timeout,
        "grace {grace}s > preStop {pause}s + drain_timeout"
    );
}

#[test]
fn single_overlay_is_one_replica_without_a_cluster() {
    let single = dir().join("single");
    let k = kustomization(&single);
    let resources: Vec<&str> = seq(&k["resources"]).iter().map(s).collect();
    assert_eq!(resources, ["../base"]);
    let patch = seq(&k["patches"])
        .iter()
        .find(|p| p["target"]["kind"] == "StatefulSet")
        .expect("a StatefulSet patch");
    assert_eq!(patch["target"]["name"], one("StatefulSet")["metadata"]["name"]);
    let ops: Vec<Value> = serde_norway::from_str(s(&patch["patch"])).unwrap();
    assert!(
        ops.iter().any(|op| op["op"] == "replace"
            && op["path"] == "/spec/replicas"
            && op["value"].as_u64() == Some(1)),
        "replicas: 1"
    );
    let generator = seq(&k["configMapGenerator"])
        .iter()
        .find(|g| g["name"] == one("ConfigMap")["metadata"]["name"])
        .expect("a generator merging into the base ConfigMap");
    assert_eq!(generator["behavior"], "merge");
    let (key, file) = seq(&generator["files"])
        .iter()
        .find_map(|f| s(f).split_once('='))
        .expect("KEY=FILE");
    assert!(
        one("ConfigMap")["data"][key].is_string(),
        "{key} replaces a key of the base"
    );
    // The file is the template render.sh reads; without placeholders it is copied as it is.
    let toml = read(&single.join(file));
    assert!(!toml.contains("@POD_"), "nothing for render.sh to replace");
    let cfg = check_passes(&rel(&single.join(file)), &toml, &[]);
    assert!(cfg.cluster.is_none(), "single/ runs no [cluster]");
    assert_eq!(
        k["generatorOptions"]["disableNameSuffixHash"].as_bool(),
        Some(true)
    );

    // Where kubectl is installed, kustomize really builds both.
    let Some(kubectl) = which("kubectl") else {
        eprintln!("kubectl is not installed: the kustomizations were not built");
        return;
    };
    for (path, replicas) in [(dir(), 3), (single.clone(), 1)] {
        let mut cmd = Command::new(&kubectl);
        cmd.arg("kustomize").arg(&path);
        let out = run(cmd, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "kubectl kustomize {}: {}",
            rel(&path),
            text(&out.stderr)
        );
        let built = text(&out.stdout);
        let docs: Vec<Value> = serde_norway::Deserializer::from_str(&built)
            .map(|de| Value::deserialize(de).unwrap())
            .collect();
        let sts = docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
        assert_eq!(sts["spec"]["replicas"].as_u64(), Some(replicas), "{}", rel(&path));
        let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
        assert_eq!(cm["metadata"]["name"], one("ConfigMap")["metadata"]["name"]);
        if replicas == 1 {
            assert_eq!(cm["data"][key].as_str(), Some(toml.as_str()));
        }
    }
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
fn containers_run_non_root_read_only_with_only_net_bind_service() {
    let pod = pod_spec();
    let non_root_pod = pod["securityContext"]["runAsNonRoot"].as_bool();
    for (list, name, add) in [
        ("containers", "edgemux", vec!["NET_BIND_SERVICE"]),
        ("initContainers", "render", vec![]),
    ] {
        let c = container(&pod, list, name);
        let sc = &c["securityContext"];
        assert_eq!(
            sc["runAsNonRoot"].as_bool().or(non_root_pod),
            Some(true),
            "{name}: runAsNonRoot"
        );
        assert_eq!(
            sc["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{name}: readOnlyRootFilesystem"
        );
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{name}: allowPrivilegeEscalation"
        );
        let caps = |k: &str| -> Vec<&str> { seq(&sc["capabilities"][k]).iter().map(s).collect() };
        assert_eq!(caps("drop"), ["ALL"], "{name}");
        assert_eq!(caps("add"), add, "{name}");
        for kind in ["requests", "limits"] {
            assert!(
                c["resources"][kind]["memory"].is_string(),
                "{name}: resources.{kind}.memory"
            );
        }
        assert!(
            c["resources"]["requests"]["cpu"].is_string(),
            "{name}: resources.requests.cpu"
        );
    }
    // The rendered config and secret copies live in memory only.
    let run_volume = volume(&pod, "run").expect("a volume run");
    assert_eq!(run_volume["emptyDir"]["medium"], "Memory");
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
