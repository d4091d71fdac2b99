//! The client against a one-shot in-process HTTP server that records the request and answers
//! with a canned response.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::*;

/// Serves one request with `status` and `body`; resolves to the request (head and body) as text.
async fn one_shot(status: &str, body: &str) -> (String, JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let task = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request).into_owned();
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if rest.len() >= len || n == 0 {
                    break;
                }
            }
            assert!(n > 0, "connection closed mid-request");
        }
        conn.write_all(response.as_bytes()).await.unwrap();
        conn.shutdown().await.unwrap();
        String::from_utf8(request).unwrap()
    });
    (url, task)
}

#[tokio::test]
async fn list_sends_the_token_and_org_and_decodes() {
    let (url, server) = one_shot(
        "200 OK",
        r#"{"total_apps":1,"apps":[{"id":"web","name":"web","status":"pending","organization":{"name":"personal","slug":"personal"}}]}"#,
    )
    .await;
    let client = Client::new(&format!("{url}/"), "aloft_secret").unwrap();
    assert_eq!(client.base_url(), url);
    let list = client.apps_list("my org").await.unwrap();
    assert_eq!(list.total_apps, 1);
    assert_eq!(list.apps[0].name, "web");
    assert_eq!(list.apps[0].organization.slug, "personal");
    let request = server.await.unwrap();
    assert!(
        request.starts_with("GET /v1/apps?org_slug=my%20org HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(
        request
            .to_ascii_lowercase()
            .contains("\r\nauthorization: bearer aloft_secret\r\n"),
        "{request}"
    );
}

#[tokio::test]
async fn create_posts_the_request() {
    let (url, server) = one_shot("201 Created", r#"{"id":"web","name":"web","status":"pending"}"#).await;
    let client = Client::new(&url, "t").unwrap();
    let app = client
        .app_create(&CreateAppRequest {
            name: "web".into(),
            org_slug: "personal".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(app.name, "web");
    let request = server.await.unwrap();
    assert!(request.starts_with("POST /v1/apps HTTP/1.1\r\n"), "{request}");
    assert!(
        request.ends_with(r#"{"name":"web","org_slug":"personal"}"#),
        "{request}"
    );
}

#[tokio::test]
async fn fly_error_bodies_become_api_errors() {
    let (url, server) = one_shot("404 Not Found", r#"{"error":"app not found","status":"unknown"}"#).await;
    let e = Client::new(&url, "t")
        .unwrap()
        .app_get("nope/../x")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Api { status: 404, message } if message == "app not found"),
        "{e:?}"
    );
    assert!(e.is_not_found());
    assert_eq!(e.to_string(), "app not found (HTTP 404)");
    let request = server.await.unwrap();
    assert!(
        request.starts_with("GET /v1/apps/nope%2F..%2Fx HTTP/1.1\r\n"),
        "{request}"
    );

    // `message` is accepted for `error`; a body that is not JSON falls back to its text or reason.
    let (url, _server) = one_shot("401 Unauthorized", r#"{"message":"invalid token"}"#).await;
    let e = Client::new(&url, "t").unwrap().app_delete("a").await.unwrap_err();
    assert!(matches!(&e, ClientError::Api { status: 401, message } if message == "invalid token"));
    let (url, _server) = one_shot("502 Bad Gateway", "").await;
    let e = Client::new(&url, "t").unwrap().app_delete("a").await.unwrap_err();
    assert!(matches!(&e, ClientError::Api { status: 502, message } if message == "Bad Gateway"));
}

#[tokio::test]
async fn delete_accepts_an_empty_202() {
    let (url, server) = one_shot("202 Accepted", "").await;
    Client::new(&url, "t").unwrap().app_delete("web").await.unwrap();
    assert!(
        server
            .await
            .unwrap()
            .starts_with("DELETE /v1/apps/web HTTP/1.1\r\n")
    );
}

#[tokio::test]
async fn a_success_with_a_bad_body_is_a_decode_error() {
    let (url, _server) = one_shot("200 OK", "not json").await;
    let e = Client::new(&url, "t").unwrap().app_get("web").await.unwrap_err();
    assert!(matches!(e, ClientError::Decode { status: 200, .. }), "{e:?}");
}

#[tokio::test]
async fn nothing_listening_is_unreachable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let e = Client::new(&url, "t")
        .unwrap()
        .apps_list("personal")
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("aloftd is not reachable at {url} (is it running? start it with `aloftd`)")
    );
}

#[test]
fn bad_urls_and_tokens_are_refused() {
    for url in ["", "127.0.0.1:4280", "ftp://x", "http://", "http://x/?a=b"] {
        assert!(
            matches!(Client::new(url, "t"), Err(ClientError::InvalidUrl { .. })),
            "{url}"
        );
    }
    for token in ["", "  ", "a b", "a\nb"] {
        assert!(
            matches!(
                Client::new("http://127.0.0.1:1", token),
                Err(ClientError::InvalidToken)
            ),
            "{token:?}"
        );
    }
    assert!(Client::new("https://aloft.example.com", "t").is_ok());
}
