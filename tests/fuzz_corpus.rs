#![allow(clippy::unwrap_used, clippy::panic)]
//! Replays every fuzz corpus and regression file through the fuzz entry points, so a normal
//! `cargo test` on stable checks what the fuzzers found and seeded.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        run(&data);
        count += 1;
    }
    assert!(count > 0, "no corpus files in {}", dir.display());
}

#[test]
fn sniff_corpus() {
    replay("sniff", edgemux::fuzzing::sniff);
}

#[test]
fn host_corpus() {
    replay("host", edgemux::fuzzing::host);
}

#[test]
fn name_corpus() {
    replay("name", edgemux::fuzzing::name);
}

#[test]
fn config_corpus() {
    replay("config", edgemux::fuzzing::config);
}

#[test]
fn proxy_header_corpus() {
    replay("proxy_header", edgemux::fuzzing::proxy_header);
}

#[test]
fn client_hello_corpus() {
    replay("client_hello", edgemux::fuzzing::client_hello);
}

#[test]
fn peer_header_corpus() {
    replay("peer_header", edgemux::fuzzing::peer_header);
}

#[test]
fn directory_value_corpus() {
    replay("directory_value", edgemux::fuzzing::directory_value);
}

#[test]
fn peer_list_corpus() {
    replay("peer_list", edgemux::fuzzing::peer_list);
}

#[test]
fn acme_value_corpus() {
    replay("acme_value", edgemux::fuzzing::acme_value);
}

#[test]
fn feed_entry_corpus() {
    replay("feed_entry", edgemux::fuzzing::feed_entry);
}

#[test]
fn access_options_corpus() {
    replay("access_options", edgemux::fuzzing::access_options);
}

#[test]
fn grpc_timeout_corpus() {
    replay("grpc_timeout", edgemux::fuzzing::grpc_timeout);
}
