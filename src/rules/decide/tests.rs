#![allow(clippy::unwrap_used, clippy::panic)]
use super::*;
use crate::rules::{options, Rules};

const HOST: &str = "app-abcd.gw.test";
const NOW: u64 = 1_000_000;

fn rules(line: &str) -> Rules {
    Rules::from_options(options::parse(line.as_bytes()).unwrap())
}

fn visit<'a>(
    client: &str,
    authorization: Option<&'a str>,
    cookie: Option<&'a str>,
    query: Option<&'a str>,
) -> Visit<'a> {
    Visit {
        host: HOST,
        client: client.parse().unwrap(),
        authorization: authorization.map(str::as_bytes),
        cookie: cookie.map(str::as_bytes),
        path: "/page",
        query,
        now: Instant::now(),
        unix_now: NOW,
    }
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", BASE64.encode(format!("{user}:{password}").as_bytes()))
}

#[test]
fn a_table_of_visits() {
    let key = LinkKey::new(b"test key");
    let good = key.mint(HOST, NOW + 60);
    let expired = key.mint(HOST, NOW - 1);
    let elsewhere = key.mint("other-abcd.gw.test", NOW + 60);
    let right = basic("alice", "s3cret");
    let wrong = basic("alice", "guess");
    let bearer_good = format!("Bearer {good}");
    let cookie_good = format!("theme=dark; {COOKIE}={good}");
    let cookie_elsewhere = format!("{COOKIE}={elsewhere}");
    let cookie_expired = format!("{COOKIE}={expired}");
    let deny = |r: Refusal| Decision::Deny(r);
    let table: Vec<(&str, Visit<'_>, Decision)> = vec![
        ("", visit("192.0.2.1", None, None, None), Decision::Allow),
        (
            "auth=alice:s3cret",
            visit("192.0.2.1", None, None, None),
            deny(Refusal::Auth),
        ),
        (
            "auth=alice:s3cret",
            visit("192.0.2.1", Some(&wrong), None, None),
            deny(Refusal::Auth),
        ),
        (
            "auth=alice:s3cret",
            visit("192.0.2.1", Some("Basic !!!"), None, None),
            deny(Refusal::Auth),
        ),
        (
            "auth=alice:s3cret",
            visit("192.0.2.1", Some(&right), None, None),
            Decision::Allow,
        ),
        (
            "allow=127.0.0.5",
            visit("127.0.0.5", None, None, None),
            Decision::Allow,
        ),
        (
            "allow=127.0.0.5",
            visit("127.0.0.6", None, None, None),
            deny(Refusal::Address),
        ),
        (
            "allow=127.0.0.5 auth=alice:s3cret",
            visit("127.0.0.6", Some(&right), None, None),
            deny(Refusal::Address),
        ),
        (
            "private",
            visit("192.0.2.1", None, None, None),
            deny(Refusal::Private { why: "no token" }),
        ),
        (
            "private",
            visit("192.0.2.1", None, Some(&cookie_good), None),
            Decision::Allow,
        ),
        (
            "private",
            visit("192.0.2.1", Some(&bearer_good), None, None),
            Decision::Allow,
        ),
        (
            "private",
            visit("192.0.2.1", None, Some(&cookie_elsewhere), None),
            deny(Refusal::Private {
                why: "token not valid for this host",
            }),
        ),
        (
            "private",
            visit("192.0.2.1", None, Some(&cookie_expired), None),
            deny(Refusal::Private { why: "expired token" }),
        ),
        (
            "private auth=alice:s3cret",
            visit("192.0.2.1", Some(&right), None, None),
            deny(Refusal::Private { why: "no token" }),
        ),
        (
            "private auth=alice:s3cret",
            visit("192.0.2.1", Some(&right), Some(&cookie_good), None),
            Decision::Allow,
        ),
    ];
    for (line, v, want) in table {
        assert_eq!(decide(&v, &rules(line), None, &key), want, "{line:?} {v:?}");
    }
}

#[test]
fn a_link_is_redeemed_into_a_host_only_cookie_and_a_clean_url() {
    let key = LinkKey::new(b"test key");
    let token = key.mint(HOST, NOW + 3600);
    let query = format!("a=1&{QUERY}={token}&b=2");
    let v = visit("192.0.2.1", None, None, Some(&query));
    let Decision::Redeem { location, set_cookie } = decide(&v, &rules("private"), None, &key) else {
        panic!("not redeemed")
    };
    assert_eq!(location, "/page?a=1&b=2");
    assert!(
        set_cookie.starts_with(&format!("{COOKIE}={token};")),
        "{set_cookie}"
    );
    for attr in ["Secure", "HttpOnly", "Path=/", "Max-Age=3600"] {
        assert!(set_cookie.contains(attr), "{set_cookie} lacks {attr}");
    }
    assert!(!set_cookie.contains("Domain"), "host-only: {set_cookie}");
    let tampered = format!("{QUERY}={}x", token);
    let v = visit("192.0.2.1", None, None, Some(&tampered));
    assert!(matches!(
        decide(&v, &rules("private"), None, &key),
        Decision::Deny(Refusal::Private { .. })
    ));
    let alone = format!("{QUERY}={token}");
    let v = visit("192.0.2.1", None, None, Some(&alone));
    assert!(
        matches!(decide(&v, &rules("private"), None, &key), Decision::Redeem { location, .. } if location == "/page")
    );
}

#[test]
fn the_rate_is_checked_after_the_address_and_before_credentials() {
    let key = LinkKey::new(b"k");
    let r = rules("rate=2/s allow=127.0.0.5 auth=alice:s3cret");
    let bucket = Bucket::new(r.rate.unwrap(), Instant::now());
    let outsider = visit("127.0.0.6", None, None, None);
    for _ in 0..5 {
        assert_eq!(
            decide(&outsider, &r, Some(&bucket), &key),
            Decision::Deny(Refusal::Address)
        );
    }
    let guesser = visit("127.0.0.5", Some("Basic eDp5"), None, None);
    assert_eq!(
        decide(&guesser, &r, Some(&bucket), &key),
        Decision::Deny(Refusal::Auth)
    );
    assert_eq!(
        decide(&guesser, &r, Some(&bucket), &key),
        Decision::Deny(Refusal::Auth)
    );
    let Decision::Deny(Refusal::Rate { retry_after }) = decide(&guesser, &r, Some(&bucket), &key) else {
        panic!("not limited")
    };
    assert!(retry_after <= Duration::from_millis(500));
    assert_eq!(Refusal::Rate { retry_after }.reason(), "rate");
}

#[test]
fn a_redeemed_link_never_redirects_off_the_host() {
    let key = LinkKey::new(b"test key");
    let query = format!("{QUERY}={}", key.mint(HOST, NOW + 60));
    let mut v = visit("192.0.2.1", None, None, Some(&query));
    v.path = "//evil.example/x";
    let Decision::Redeem { location, .. } = decide(&v, &rules("private"), None, &key) else {
        panic!("not redeemed")
    };
    assert_eq!(location, "/evil.example/x");
    v.path = "/\\evil.example";
    let Decision::Redeem { location, .. } = decide(&v, &rules("private"), None, &key) else {
        panic!("not redeemed")
    };
    assert_eq!(location, "/evil.example", "browsers read /\\ as //");
}

#[test]
fn a_planted_cookie_of_the_same_name_does_not_lock_the_visitor_out() {
    let key = LinkKey::new(b"test key");
    let good = key.mint(HOST, NOW + 60);
    let planted = format!("{COOKIE}=1.AAAA; {COOKIE}={good}");
    let v = visit("192.0.2.1", None, Some(&planted), None);
    assert_eq!(decide(&v, &rules("private"), None, &key), Decision::Allow);
    let only_bad = format!("{COOKIE}=1.AAAA");
    let v = visit("192.0.2.1", None, Some(&only_bad), None);
    assert_eq!(
        decide(&v, &rules("private"), None, &key),
        Decision::Deny(Refusal::Private {
            why: "token not valid for this host"
        })
    );
}
