//! WebSocket over HTTP/2 (RFC 8441) end to end: a client speaking extended CONNECT over h2
//! (hyper's client, tungstenite for the frames) through the gateway and a real `ssh -R` tunnel
//! to a backend that speaks plain RFC 6455 over HTTP/1.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::http::{h2_ready, http_backend};
use common::ssh::{KeyKind, Transport};
use common::{TestEnv, SETUP};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::ext::Protocol;
use hyper::{Method, Request, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[test]
fn an_rfc_8441_websocket_echoes_100_messages_and_outlives_the_connections_idle_timeout() {
    let env = TestEnv::new();
    // An h2 connection without a live stream is closed after header_timeout: the WebSocket
    // must count as one while it is open, and 12 s of silence is four times the timeout.
    let gw = env.gateway().limit("header_timeout", "3s").start();

    let key = env.key("owner", KeyKind::Ed25519);
    let client = gw.ssh(&key, Transport::Tls);
    let _tunnel = client.open_tunnel("app", 80, http_backend("alpha"));
    let host = key.host("app");
    let port = gw.port();
    let ca = env.pki.ca_der.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut sender = h2_ready(&ca, port, &host, "/id").await;

        let connect = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri(format!("https://{host}:{port}/ws"))
            .header("sec-websocket-version", "13")
            .extension(Protocol::from_static("websocket"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(connect).await.expect("extended CONNECT");
        assert_eq!(resp.status(), StatusCode::OK, "RFC 8441 wants 200: {resp:?}");
        let upgraded = hyper::upgrade::on(resp)
            .await
            .expect("the stream carries the WebSocket");
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
        for i in 0..100 {
            let msg = Message::text(format!("message {i} over one h2 stream"));
            ws.send(msg.clone()).await.expect("send");
            let echoed = tokio::time::timeout(SETUP, ws.next())
                .await
                .expect("echo in time");
            assert_eq!(echoed.expect("a message").expect("no error"), msg);
        }
        tokio::time::sleep(Duration::from_secs(12)).await;
        let last = Message::binary(vec![7u8; 64 * 1024]);
        ws.send(last.clone()).await.expect("send after 12 s idle");
        let echoed = tokio::time::timeout(SETUP, ws.next())
            .await
            .expect("echo after idle");
        assert!(
            echoed.expect("a message").expect("no error") == last,
            "64 KiB echo differs"
        );
        ws.close(None).await.expect("close");
    });
}
