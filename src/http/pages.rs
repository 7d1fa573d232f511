//! What a person sees from the gateway itself: the landing page on the apex host and the pages of
//! its own errors (no tunnel, a tunnel that does not answer, a timeout, the access rules'
//! refusals). HTML for browsers (`Accept: text/html`), the same short text for everything else.
//! Small and self-contained (no script, no external asset); nothing from the request is shown
//! unescaped, and the status code never changes.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::Response;

use super::Body;
use crate::client_config::{ssh_config, SshTarget};

/// What the gateway said in a text answer of its own (an extension, so a page can say it too;
/// answers from tunnels never carry it).
#[derive(Debug, Clone)]
pub(super) struct Said(pub(super) String);

/// Whether the client reads HTML: browsers ask for `text/html` first.
pub(super) fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// An error the gateway made itself, as the client reads it: an HTML page when `html`, else its
/// short text; either way marked as varying by `Accept`. Anything else (answers from tunnels
/// above all) as it is. Headers (`WWW-Authenticate`, `Retry-After`, …) and the status stay.
pub(super) fn negotiate(mut resp: Response<Body>, html: bool) -> Response<Body> {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let Some(Said(text)) = resp.extensions_mut().remove::<Said>() else {
        return resp;
    };
    resp.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("accept"));
    if !html {
        return resp;
    }
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let mut lines = text.lines();
    let mut body = format!("<p>{}</p>", escape(lines.next().unwrap_or_default()));
    let rest: Vec<&str> = lines.filter(|l| !l.trim().is_empty()).collect();
    if !rest.is_empty() {
        body.push_str(&format!("<pre>{}</pre>", escape(&rest.join("\n"))));
    }
    let (mut parts, _) = resp.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(HTML));
    Response::from_parts(parts, full(page(&title, &body)))
}

/// The apex host's page: what this gateway is, the ssh config block and the SSH host key
/// fingerprint to pin, a link to the docs. Nothing about the tunnels.
pub(super) fn landing(domain: &str, port: u16, fingerprint: &str, html: bool) -> Response<Body> {
    let connect = format!("{domain}:{port}");
    let alias = format!("edgemux-{domain}");
    let block = ssh_config(&SshTarget {
        alias: domain,
        server_name: domain,
        connect: &connect,
        ca: None,
        host_key_alias: Some(&alias),
    });
    let ssh = format!("ssh -R myapp:80:localhost:3000 {domain}");
    let url = format!(
        "{}/",
        crate::names::https_origin(&format!("myapp-KEYID.{domain}"), port)
    );
    let (content_type, body) = if html {
        let body = format!(
            "<p>{domain} is an edgemux gateway: it publishes local web apps through SSH tunnels, \
             at <code>{url}</code>.</p>\
             <h2>Start a tunnel</h2><p>Add this to <code>~/.ssh/config</code>:</p><pre>{block}</pre>\
             <p>then run <code>{ssh}</code>; the session prints your URL.</p>\
             <h2>Pin the gateway</h2><p>Its SSH host key fingerprint is <code>{fingerprint}</code>.</p>\
             <p><a href=\"/docs\">Documentation</a></p>",
            domain = escape(domain),
            url = escape(&url),
            block = escape(&block),
            ssh = escape(&ssh),
            fingerprint = escape(fingerprint),
        );
        (HTML, page(&format!("{domain} — edgemux"), &body))
    } else {
        let text = format!(
            "{domain} is an edgemux gateway: it publishes local web apps through SSH tunnels, at {url}\n\n\
             Start a tunnel: add this to ~/.ssh/config\n\n{block}\nthen run: {ssh}\n\n\
             SSH host key fingerprint: {fingerprint}\nDocumentation: {docs}\n",
            docs = crate::names::https_origin(domain, port) + "/docs",
        );
        (TEXT, text)
    };
    let mut r = Response::new(full(body));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("accept"));
    r
}

/// The documentation this binary was built with, on the apex host's `/docs`.
pub(super) fn docs() -> Response<Body> {
    let mut r = Response::new(full(include_str!("../../README.md").to_owned()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        // Markdown, shown as text: browsers would offer `text/markdown` as a download.
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

const HTML: &str = "text/html; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

fn full(s: String) -> Body {
    Full::new(Bytes::from(s)).map_err(|never| match never {}).boxed()
}

/// One page around `body` (already escaped), with its own small style.
fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{title}</title><style>\
         body{{font:16px/1.5 system-ui,sans-serif;max-width:46rem;margin:3rem auto;padding:0 1rem;color:#222}}\
         h1{{font-size:1.5rem}}h2{{font-size:1.1rem;margin-top:2rem}}\
         code,pre{{background:#f2f2f2;border-radius:4px}}code{{padding:0 .25rem}}\
         pre{{padding:.75rem;overflow-x:auto;white-space:pre-wrap}}footer{{color:#888;margin-top:3rem}}\
         </style></head><body><h1>{title}</h1>{body}<footer>edgemux</footer></body></html>\n",
        title = escape(title),
    )
}

/// HTML-escapes `s` for text and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hyper::StatusCode;

    async fn body(r: Response<Body>) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn gateway_errors_become_pages_with_their_status_and_headers() {
        let mut r = super::super::text(
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests to <app>\nslow down & retry\n".into(),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("3"));
        let r = negotiate(r, true);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        assert_eq!(r.headers()[header::CONTENT_TYPE], HTML);
        assert_eq!(r.headers()[header::VARY], "accept");
        let html = body(r).await;
        assert!(html.contains("<title>429 Too Many Requests</title>"), "{html}");
        assert!(html.contains("<p>too many requests to &lt;app&gt;</p>"), "{html}");
        assert!(html.contains("<pre>slow down &amp; retry</pre>"), "{html}");
        assert!(!html.contains("<app>"));
        assert!(html.len() < 2048, "small: {} bytes", html.len());
    }

    #[tokio::test]
    async fn answers_that_are_not_the_gateways_errors_stay_as_they_are() {
        let ok = super::super::text(StatusCode::OK, "fine\n".into());
        assert_eq!(negotiate(ok, true).headers()[header::CONTENT_TYPE], TEXT);
        let mut upstream = Response::new(full("<h1>app's own 404</h1>".into()));
        *upstream.status_mut() = StatusCode::NOT_FOUND;
        assert_eq!(body(negotiate(upstream, true)).await, "<h1>app's own 404</h1>");
    }

    #[tokio::test]
    async fn the_landing_page_shows_the_block_and_the_fingerprint_and_nothing_else() {
        let html = body(landing("gw.example.com", 443, "SHA256:abc", true)).await;
        assert!(html.contains("Host gw.example.com"));
        assert!(html.contains("SHA256:abc"));
        assert!(html.contains("href=\"/docs\""));
        assert!(html.contains("https://myapp-KEYID.gw.example.com/"));
        let text = body(landing("gw.example.com", 8443, "SHA256:abc", false)).await;
        assert!(text.contains("-connect gw.example.com:8443"));
        assert!(text.contains("Documentation: https://gw.example.com:8443/docs"));
        assert!(!text.contains('<'));
        assert!(wants_html(&{
            let mut h = HeaderMap::new();
            h.insert(
                header::ACCEPT,
                HeaderValue::from_static("text/html,application/xhtml+xml,*/*;q=0.8"),
            );
            h
        }));
        assert!(!wants_html(&HeaderMap::new()));
    }
}
