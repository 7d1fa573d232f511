//! The `~/.ssh/config` block that lets a plain `ssh -R myapp:80:localhost:3000 GATEWAY` reach
//! edgemux through TLS on its one port: what `edgemux ssh-config` and `edgemux dev` print and
//! the apex page shows. One rendering, so the three never disagree.

/// Where and how to reach a gateway.
#[derive(Debug, Clone)]
pub struct SshTarget<'a> {
    /// What the developer types after `ssh` (the `Host` line).
    pub alias: &'a str,
    /// The gateway's name: TLS SNI and the name its certificate is checked against.
    pub server_name: &'a str,
    /// `host:port` to connect to (the name itself, or an address when DNS is not set up yet).
    pub connect: &'a str,
    /// A CA file to verify the gateway with instead of the system's roots (a private CA).
    pub ca: Option<&'a str>,
    /// A name for the gateway's SSH host key in `known_hosts` (`HostKeyAlias`), so it is not
    /// mistaken for an sshd on the same host.
    pub host_key_alias: Option<&'a str>,
}

/// Whether `s` is safe as a host name or address in the block: letters, digits, `.-_`, not
/// starting with `-` (openssl would read an option); an IPv6 address in brackets.
pub fn is_plain_host(s: &str) -> bool {
    let name = |s: &str| {
        !s.is_empty()
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b))
    };
    let v6 = |s: &str| {
        s.strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
    };
    s.len() <= 253 && (name(s) || v6(s))
}

/// Whether `path` can go into the block: no control characters (a newline would start a new
/// line of the user's ssh config).
pub fn is_plain_path(path: &str) -> bool {
    !path.is_empty() && !path.chars().any(char::is_control)
}

/// A path for the ProxyCommand line: as is when plain, else single-quoted for the shell; `%` is
/// doubled, since ssh expands `%` tokens before the shell sees the command.
fn shell_word(s: &str) -> String {
    let plain = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b));
    let word = if !s.is_empty() && plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    };
    word.replace('%', "%%")
}

/// The block: the verifying `openssl s_client` as ProxyCommand (the TLS certificate proves the
/// gateway, so its SSH host key is accepted on first use), keepalives that find a dead path
/// within 45 s, and `ExitOnForwardFailure` so a refused tunnel ends the command instead of
/// leaving a session that serves nothing.
pub fn ssh_config(t: &SshTarget<'_>) -> String {
    let ca =
        t.ca.map_or_else(String::new, |ca| format!(" -CAfile {}", shell_word(ca)));
    let alias = t
        .host_key_alias
        .map_or_else(String::new, |a| format!("    HostKeyAlias {a}\n"));
    format!(
        "Host {alias_name}\n    \
         ProxyCommand openssl s_client -quiet -verify_quiet -verify_return_error{ca} -verify_hostname {name} \
         -servername {name} -connect {connect}\n    \
         StrictHostKeyChecking accept-new\n{alias}    \
         ServerAliveInterval 15\n    \
         ServerAliveCountMax 3\n    \
         ExitOnForwardFailure yes\n",
        alias_name = t.alias,
        name = t.server_name,
        connect = t.connect,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_verifies_the_gateway_and_keeps_the_tunnel_honest() {
        let block = ssh_config(&SshTarget {
            alias: "gw.example.com",
            server_name: "gw.example.com",
            connect: "gw.example.com:443",
            ca: None,
            host_key_alias: None,
        });
        assert!(block.starts_with("Host gw.example.com\n"));
        assert!(block.contains(
            "ProxyCommand openssl s_client -quiet -verify_quiet -verify_return_error -verify_hostname \
             gw.example.com -servername gw.example.com -connect gw.example.com:443\n"
        ));
        for line in [
            "ServerAliveInterval 15",
            "ServerAliveCountMax 3",
            "ExitOnForwardFailure yes",
        ] {
            assert!(block.contains(line), "{line} missing:\n{block}");
        }
        assert!(!block.contains("HostKeyAlias"));
    }

    #[test]
    fn a_private_ca_path_is_quoted_for_the_shell() {
        let block = ssh_config(&SshTarget {
            alias: "edgemux-dev",
            server_name: "localhost",
            connect: "127.0.0.1:8443",
            ca: Some("/home/a b/it's/ca.pem"),
            host_key_alias: Some("edgemux-dev"),
        });
        assert!(block.contains(r"-CAfile '/home/a b/it'\''s/ca.pem'"), "{block}");
        assert_eq!(shell_word("/ca/100%.pem"), "'/ca/100%%.pem'");
        assert!(!is_plain_path("/ca\nHost *\n"));
        assert!(block.contains("    HostKeyAlias edgemux-dev\n"));
        assert_eq!(shell_word("certs/dev/ca.pem"), "certs/dev/ca.pem");
    }

    #[test]
    fn only_plain_hosts_go_into_the_block() {
        assert!(is_plain_host("gw.example.com"));
        assert!(is_plain_host("[2001:db8::1]"));
        assert!(is_plain_host("127.0.0.1"));
        for bad in [
            "",
            "gw example",
            "gw\nHost *",
            "gw;rm",
            "gw$(x)",
            "-proxy",
            "2001:db8::1",
            "[gw]",
        ] {
            assert!(!is_plain_host(bad), "{bad:?}");
        }
    }
}
