//! Micro-benchmark of the rewrite every proxied request gets on its way into a tunnel: origin-form
//! URI, hop-by-hop headers removed, `Host` set, the forwarding headers written from what the
//! gateway knows (`http::forward`).
//!
//! `cargo bench --bench forward` (add `-- --quick` for a fast pass). No timing assertions: the
//! end-to-end comparison is `bench/run.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use hyper::Request;

/// What a browser sends, plus the connection headers a proxy must drop.
fn browser_request(spoofed: bool) -> Request<()> {
    let mut b = Request::builder()
        .uri("https://app-abcd1234.gw.example.com/assets/app.js?v=3")
        .header("host", "app-abcd1234.gw.example.com")
        .header(
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        )
        .header("accept", "*/*")
        .header("accept-language", "en-US,en;q=0.5")
        .header("accept-encoding", "gzip, deflate, br, zstd")
        .header("referer", "https://app-abcd1234.gw.example.com/")
        .header("cookie", "session=0123456789abcdef0123456789abcdef")
        .header("sec-fetch-dest", "script")
        .header("sec-fetch-mode", "no-cors")
        .header("connection", "keep-alive")
        .header("keep-alive", "timeout=5");
    if spoofed {
        b = b
            .header("x-forwarded-for", "203.0.113.9, 10.0.0.2")
            .header("forwarded", "for=203.0.113.9;proto=https")
            .header("x-real-ip", "203.0.113.9")
            .header("cf-connecting-ip", "203.0.113.9");
    }
    b.body(()).unwrap()
}

fn prepare(c: &mut Criterion) {
    let client = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    let host = "app-abcd1234.gw.example.com";
    let mut g = c.benchmark_group("prepare_upstream_request");
    for (name, spoofed, trusted) in [
        ("browser", false, false),
        ("visitor claims an address", true, false),
        ("trusted forwarder chain", true, true),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || browser_request(spoofed),
                |req| edgemux::http::bench_prepare(black_box(req), client, host, trusted),
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, prepare);
criterion_main!(benches);
