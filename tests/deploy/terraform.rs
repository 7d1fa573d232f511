//! `deploy/terraform/aws-nlb/`: every variable and output is documented in its README (and the
//! README documents no other), the files are laid out as `terraform fmt` writes them, the NLB
//! is what edgemux needs (TCP passthrough, PROXY v2, client IP preservation off, a `/readyz`
//! health check that lets a draining replica finish), the peer port is open between the
//! instances only, and the `[cluster]` section a launched replica writes at first boot passes
//! `edgemux check` on the systemd kit's config.
//!
//! Terraform is not a Debian package, so the layout check here is our own: no tabs or trailing
//! blanks, two spaces per level of nesting, balanced brackets, `=` aligned within a run of
//! one-line attributes. Where a `terraform` binary is on the PATH, `terraform fmt -check` runs too.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::support::{deploy, files_with_ext, read, rel, run, text, which};

fn module() -> PathBuf {
    deploy().join("terraform/aws-nlb")
}

/// Names of the top-level `variable "x" {` / `output "x" {` blocks of every .tf file.
fn declared(kind: &str) -> BTreeSet<String> {
    files_with_ext(&module(), "tf")
        .iter()
        .flat_map(|p| read(p).lines().map(String::from).collect::<Vec<_>>())
        .filter_map(|l| {
            let rest = l.strip_prefix(kind)?.strip_prefix(" \"")?;
            Some(rest.split('"').next()?.to_string())
        })
        .collect()
}

/// The `default = …` of `variable "name"` in variables.tf, as written (`9090`, `"edgemux"`).
pub fn variable_default(name: &str) -> Option<String> {
    let vars = read(&module().join("variables.tf"));
    let opening = format!("variable \"{name}\" {{");
    vars.lines()
        .skip_while(|l| *l != opening)
        .take_while(|l| *l != "}")
        .find_map(|l| l.strip_prefix("  default ")?.trim_start().strip_prefix("= "))
        .map(|v| v.trim().to_string())
}

/// The backquoted first cells of the table under the README heading `## {section}`.
fn documented(readme: &str, section: &str) -> BTreeSet<String> {
    let heading = format!("## {section}");
    readme
        .lines()
        .skip_while(|l| l.trim() != heading)
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next().map(String::from))
        .collect()
}

#[test]
fn every_variable_and_output_is_documented() {
    for file in [
        "main.tf",
        "variables.tf",
        "outputs.tf",
        "versions.tf",
        "README.md",
    ] {
        assert!(
            module().join(file).is_file(),
            "deploy/terraform/aws-nlb/{file} is missing"
        );
    }
    let readme = read(&module().join("README.md"));
    for (kind, section) in [("variable", "Variables"), ("output", "Outputs")] {
        let names = declared(kind);
        assert!(!names.is_empty(), "no {kind} blocks found");
        assert_eq!(
            names,
            documented(&readme, section),
            "README.md's {section} table vs the {kind}s"
        );
    }
    for v in [
        "name",
        "vpc_id",
        "subnet_ids",
        "instance_ids",
        "instance_count",
        "etcd_endpoints",
        "peer_port",
    ] {
        assert!(declared("variable").contains(v), "variable {v}");
    }
    for o in ["nlb_dns_name", "nlb_zone_id"] {
        assert!(declared("output").contains(o), "output {o}");
    }
}

/// main.tf with every run of blanks squeezed to one: `key = value` however fmt aligns it.
fn main_tf() -> String {
    read(&module().join("main.tf"))
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `resource "kind" "name" {` of main.tf up to its closing brace, blanks squeezed as in [`main_tf`].
fn resource(kind: &str, name: &str) -> String {
    let opening = format!("resource \"{kind}\" \"{name}\" {{");
    let main = read(&module().join("main.tf"));
    let body: Vec<String> = main
        .lines()
        .skip_while(|l| *l != opening)
        .take_while(|l| *l != "}")
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert!(!body.is_empty(), "main.tf: no {opening}");
    body.join("\n")
}

#[test]
fn nlb_passes_tcp_through_with_proxy_v2() {
    let main = main_tf();
    for want in [
        "resource \"aws_lb\" \"this\" {",
        "load_balancer_type = \"network\"",
        "resource \"aws_lb_target_group\" \"this\" {",
        "proxy_protocol_v2 = true",
        "preserve_client_ip = false",
        "protocol = \"TCP\"",
        "https = 443",
        "http = 80",
        "resource \"aws_lb_listener\" \"this\" {",
        "from_port = var.admin_port",
        "cidr_ipv4 = data.aws_vpc.this.cidr_block",
    ] {
        assert!(main.contains(want), "main.tf: no {want:?}");
    }
    assert!(
        !main.contains("protocol = \"TLS\""),
        "the NLB must not terminate TLS"
    );
}

#[test]
fn health_check_reads_readyz_and_a_draining_replica_keeps_its_connections() {
    let tg = resource("aws_lb_target_group", "this");
    for want in [
        "protocol = \"HTTP\"",
        "port = tostring(var.admin_port)",
        "path = \"/readyz\"",
        "enable_unhealthy_connection_termination = false",
    ] {
        assert!(tg.contains(want), "target group: no {want:?}\n{tg}");
    }
    let seconds = |key: &str| -> u64 {
        let line = tg
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("target group: no {key}"));
        line.parse().unwrap()
    };
    // Both must outlast edgemux's drain (limits.drain_timeout, 30 s in the systemd kit).
    let systemd = crate::support::check_passes(
        "deploy/systemd/edgemux.toml",
        &read(&deploy().join("systemd/edgemux.toml")),
        &[],
    );
    let drain = systemd.limits.drain_timeout.as_secs();
    for key in ["deregistration_delay", "unhealthy_draining_interval"] {
        assert!(seconds(key) > drain, "{key} must exceed drain_timeout {drain}s");
    }
    // Noticing a drain takes interval × unhealthy_threshold; keep it well inside the drain.
    assert!(seconds("interval") * seconds("unhealthy_threshold") <= drain / 2);
    // The NLB reaches the admin port: ingress from its group, egress from it.
    let admin = resource("aws_vpc_security_group_ingress_rule", "admin_from_nlb");
    assert!(admin.contains("from_port = var.admin_port"));
    assert!(admin.contains("referenced_security_group_id = aws_security_group.nlb.id"));
    let egress = resource("aws_vpc_security_group_egress_rule", "nlb");
    assert!(egress.contains("admin = var.admin_port"), "{egress}");
}

#[test]
fn peer_port_is_open_between_the_instances_only() {
    let peer = resource("aws_vpc_security_group_ingress_rule", "peer");
    for want in [
        "security_group_id = aws_security_group.instances.id",
        "from_port = var.peer_port",
        "to_port = var.peer_port",
        "referenced_security_group_id = aws_security_group.instances.id",
    ] {
        assert!(peer.contains(want), "peer rule: no {want:?}\n{peer}");
    }
    assert!(!peer.contains("cidr_ipv"), "the peer rule names no CIDR");
    // No other rule, listener or target group mentions the peer port.
    let main = main_tf();
    assert_eq!(
        main.matches("var.peer_port").count(),
        3,
        "var.peer_port appears in the peer rule (from/to) and the replicas' [cluster] only"
    );
    for (kind, name) in [
        ("aws_lb_listener", "this"),
        ("aws_lb_target_group", "this"),
        ("aws_vpc_security_group_ingress_rule", "nlb"),
        ("aws_vpc_security_group_egress_rule", "nlb"),
    ] {
        assert!(
            !resource(kind, name).contains("peer_port"),
            "{kind}.{name} uses the peer port"
        );
    }
}

/// `${name}` interpolations of a template replaced from `vars`; anything else Terraform would
/// interpret (`%{`, or a `${` left over) fails the test.
fn render(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (name, value) in vars {
        out = out.replace(&format!("${{{name}}}"), value);
    }
    assert!(
        !out.contains("${") && !out.contains("%{"),
        "unrendered template syntax left:\n{out}"
    );
    out
}

#[test]
fn a_launched_replicas_cluster_section_passes_check() {
    // The AMI's config: the systemd kit's, set up for several replicas (commented settings on),
    // without its example [cluster] section, which the boot script adds.
    let systemd = crate::support::uncomment_settings(&read(&deploy().join("systemd/edgemux.toml")));
    let ami_config = &systemd[..systemd.find("\n[cluster]\n").expect("a [cluster] example")];
    assert!(ami_config.contains("\nhost_key = \"/run/credentials/edgemux.service/ssh-host-key\""));
    let template = read(&module().join("cluster.toml.tftpl"));
    let main = main_tf();
    for name in ["cluster_name", "endpoints", "store_tls", "peer_port"] {
        assert!(
            template.contains(&format!("${{{name}}}")),
            "cluster.toml.tftpl uses ${{{name}}}"
        );
        assert!(main.contains(&format!("{name} = ")), "main.tf passes {name}");
    }
    let peer_port = variable_default("peer_port").unwrap();
    let section = render(
        &template,
        &[
            ("cluster_name", "prod"),
            (
                "endpoints",
                "[\"https://10.0.0.10:2379\",\"https://10.0.1.10:2379\"]",
            ),
            ("store_tls", "store_tls = { ca = \"/etc/edgemux/etcd-ca.pem\" }"),
            ("peer_port", &peer_port),
        ],
    )
    // What the boot script's sed does with the instance's metadata.
    .replace("@replica@", "i-0123456789abcdef0")
    .replace("@address@", "10.0.1.5");
    let config = format!("{ami_config}\n{section}");
    let cfg = crate::support::check_passes("a launched replica's edgemux.toml", &config, &[]);
    let cluster = cfg.cluster.expect("[cluster]");
    assert_eq!(cluster.replica_name, "i-0123456789abcdef0");
    assert_eq!(
        cluster.peer_advertise.to_string(),
        format!("10.0.1.5:{peer_port}")
    );
    assert_eq!(
        cluster.secret_file,
        std::path::Path::new("/run/credentials/edgemux.service/cluster-secret")
    );
    assert!(cluster.store_tls.is_some());

    // The boot script: where terraform is installed, render it as the module does and check it
    // is valid sh that appends exactly this section and installs the systemd kit's drop-in.
    let Some(tf) = which("terraform") else {
        eprintln!("terraform is not installed: replica-boot.sh.tftpl not rendered");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let m = module().display().to_string();
    std::fs::write(
        dir.path().join("main.tf"),
        format!(
            r#"output "boot" {{
  value = templatefile("{m}/replica-boot.sh.tftpl", {{
    ssm_parameter_prefix = "/edgemux/prod/"
    etcd_ca_pem          = ""
    cluster_dropin       = file("{m}/../../systemd/edgemux.service.d/cluster.conf")
    cluster_toml         = "CLUSTER-TOML"
  }})
}}
"#
        ),
    )
    .unwrap();
    for args in [
        &["init", "-input=false"][..],
        &["apply", "-auto-approve", "-input=false"],
    ] {
        let mut cmd = Command::new(&tf);
        cmd.args(args).current_dir(dir.path());
        let out = run(cmd, Duration::from_secs(120));
        assert!(out.status.success(), "terraform {args:?}:\n{}", text(&out.stderr));
    }
    let mut cmd = Command::new(&tf);
    cmd.args(["output", "-raw", "boot"]).current_dir(dir.path());
    let boot = text(&run(cmd, Duration::from_secs(60)).stdout);
    assert!(
        boot.contains(">>\"$config\" <<'TOML'\nCLUSTER-TOML\nTOML\n"),
        "{boot}"
    );
    assert!(boot.contains(&read(&deploy().join("systemd/edgemux.service.d/cluster.conf"))));
    assert!(boot.contains("--name \"/edgemux/prod/$1\""));
    let script = dir.path().join("boot.sh");
    std::fs::write(&script, &boot).unwrap();
    let mut sh = Command::new("sh");
    sh.arg("-n").arg(&script);
    let out = run(sh, Duration::from_secs(10));
    assert!(out.status.success(), "sh -n: {}", text(&out.stderr));
}

#[test]
fn terraform_files_are_formatted() {
    for path in files_with_ext(&module(), "tf") {
        if let Err(problem) = check_layout(&read(&path)) {
            panic!(
                "{} is not laid out as terraform fmt writes it: {problem}",
                rel(&path)
            );
        }
    }
    match which("terraform") {
        Some(tf) => {
            let mut cmd = Command::new(tf);
            cmd.args(["fmt", "-check", "-diff", "-recursive"]).arg(module());
            let out = run(cmd, Duration::from_secs(60));
            assert!(
                out.status.success(),
                "terraform fmt -check:\n{}",
                text(&out.stdout)
            );
        }
        None => eprintln!("terraform is not installed: checked the layout without `terraform fmt`"),
    }
}

#[test]
fn layout_checker_catches_what_fmt_would_change() {
    let good =
        "a {\n  x  = 1\n  yy = 2 # c\n  zzz = [\n    \"}\", # {\n  ]\n\n  b {\n    z = \"${q}\"\n  }\n}\n";
    assert_eq!(check_layout(good), Ok(()));
    let two_on_a_line = "a = f({\n  b = [{\n    c = 1\n  }]\n})\n";
    assert_eq!(check_layout(two_on_a_line), Ok(()));
    for bad in [
        "a {\n\tx = 1\n}\n",
        "a {\n   x = 1\n}\n",
        "a {\n  x = 1\n",
        "a {\n  x = 1\n  yy = 2\n}\n",
        "a {\n  x  = 1\n  yy = 2\n  z = 3\n}\n",
        "a {\n  x   = 1\n  yy  = 2\n}\n",
        "a {\n  x = 1 \n}\n",
        "a = f({\n    b = 1\n})\n",
        "a = f({\n  b = 1\n}\n",
    ] {
        assert!(check_layout(bad).is_err(), "accepted {bad:?}");
    }
}

/// Bracket depth change of one line, ignoring strings (with `${…}` inside) and `#` comments;
/// also the number of closers the line starts with.
fn depth_change(line: &str) -> (i32, i32) {
    let (mut delta, mut leading, mut in_string, mut escaped, mut seen_other) = (0, 0, false, false, false);
    for ch in line.trim_start().chars() {
        if in_string {
            match (escaped, ch) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match ch {
            '"' => in_string = true,
            '#' => break,
            '{' | '[' | '(' => delta += 1,
            '}' | ']' | ')' => {
                delta -= 1;
                if !seen_other {
                    leading += 1;
                }
            }
            _ => {}
        }
        if !matches!(ch, '}' | ']' | ')') {
            seen_other = true;
        }
    }
    (delta, leading)
}

/// The layout rules terraform fmt enforces that matter for review (see the module doc).
fn check_layout(src: &str) -> Result<(), String> {
    if !src.ends_with('\n') || src.ends_with("\n\n") {
        return Err("the file must end with exactly one newline".into());
    }
    // terraform fmt indents one level per line that leaves brackets open, however many it opens
    // (`x = f({` is one level), and a closer at the start of a line ends its line's level: a
    // stack of the brackets each opening line left open.
    let mut levels: Vec<i32> = Vec::new();
    // (line, indent, key width, `=` column) of the current run of one-line attributes.
    let mut run: Vec<(usize, usize, usize, usize)> = Vec::new();
    for (i, line) in src.lines().enumerate() {
        let n = i + 1;
        if line.contains('\t') {
            return Err(format!("line {n}: tab"));
        }
        if line.ends_with(' ') {
            return Err(format!("line {n}: trailing blank"));
        }
        let (delta, leading) = depth_change(line);
        close(&mut levels, leading).map_err(|()| format!("line {n}: unbalanced closing bracket"))?;
        let indent = line.len() - line.trim_start().len();
        let want = 2 * levels.len();
        if !line.trim().is_empty() && indent != want {
            return Err(format!("line {n}: indented {indent}, want {want}"));
        }
        // One-line `key = value` attributes in a run share one `=` column, one space past the
        // longest key; anything else (blank, comment, block, multi-line value) ends the run.
        let attribute = line.trim_start().split_once(" = ").filter(|(key, _)| {
            delta == 0 && !key.is_empty() && key.trim_end().chars().all(|c| c.is_alphanumeric() || c == '_')
        });
        match attribute {
            Some((key, _)) => run.push((n, indent, key.trim_end().len(), line.find(" = ").unwrap() + 1)),
            None => check_run(&mut run)?,
        }
        let rest = delta + leading;
        if rest > 0 {
            levels.push(rest);
        } else {
            close(&mut levels, -rest).map_err(|()| format!("line {n}: unbalanced closing bracket"))?;
        }
    }
    check_run(&mut run)?;
    if !levels.is_empty() {
        return Err(format!("{} bracket(s) left open", levels.iter().sum::<i32>()));
    }
    Ok(())
}

/// Closes `n` brackets, innermost line's first; `Err` when fewer are open.
fn close(levels: &mut Vec<i32>, mut n: i32) -> Result<(), ()> {
    while n > 0 {
        let top = levels.last_mut().ok_or(())?;
        if *top > n {
            *top -= n;
            n = 0;
        } else {
            n -= *top;
            levels.pop();
        }
    }
    Ok(())
}

fn check_run(run: &mut Vec<(usize, usize, usize, usize)>) -> Result<(), String> {
    let widest = run.iter().map(|&(_, _, width, _)| width).max().unwrap_or(0);
    for &(n, indent, _, col) in run.iter() {
        if col != indent + widest + 1 {
            let want = indent + widest + 1;
            return Err(format!(
                "line {n}: `=` at column {col}, want {want} (aligned, one space past the longest key)"
            ));
        }
    }
    run.clear();
    Ok(())
}
