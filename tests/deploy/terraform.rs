//! `deploy/terraform/aws-nlb/`: every variable and output is documented in its README (and the
//! README documents no other), the files are laid out as `terraform fmt` writes them, and the NLB
//! is what edgemux needs (TCP passthrough, PROXY v2, client IP preservation off).
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
    for v in ["name", "vpc_id", "subnet_ids", "instance_ids"] {
        assert!(declared("variable").contains(v), "variable {v}");
    }
    for o in ["nlb_dns_name", "nlb_zone_id"] {
        assert!(declared("output").contains(o), "output {o}");
    }
}

#[test]
fn nlb_passes_tcp_through_with_proxy_v2() {
    // Whitespace-insensitive: `key = value` as terraform fmt aligns it.
    let main: String = read(&module().join("main.tf"))
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n");
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
    for bad in [
        "a {\n\tx = 1\n}\n",
        "a {\n   x = 1\n}\n",
        "a {\n  x = 1\n",
        "a {\n  x = 1\n  yy = 2\n}\n",
        "a {\n  x  = 1\n  yy = 2\n  z = 3\n}\n",
        "a {\n  x   = 1\n  yy  = 2\n}\n",
        "a {\n  x = 1 \n}\n",
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
    let mut depth = 0i32;
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
        let indent = line.len() - line.trim_start().len();
        let want = 2 * (depth - leading).max(0) as usize;
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
        depth += delta;
        if depth < 0 {
            return Err(format!("line {n}: unbalanced closing bracket"));
        }
    }
    check_run(&mut run)?;
    if depth != 0 {
        return Err(format!("{depth} bracket(s) left open"));
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
