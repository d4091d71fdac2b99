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

/// Serves one request per canned `(status, content type, body)`, in order, each on its own
/// connection; resolves to the requests (head and body) as text.
async fn serve(responses: Vec<(&'static str, &'static str, String)>) -> (String, JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut requests = Vec::new();
        for (status, content_type, body) in responses {
            let (mut conn, _) = listener.accept().await.unwrap();
            requests.push(read_request(&mut conn).await);
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(response.as_bytes()).await.unwrap();
            conn.shutdown().await.unwrap();
        }
        requests
    });
    (url, task)
}

async fn read_request(conn: &mut tokio::net::TcpStream) -> String {
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
                return text;
            }
        }
        assert!(n > 0, "connection closed mid-request");
    }
}

const MACHINE: &str = r#"{"id":"3d8d413b29d089","name":"web-1","state":"started","region":"local","instance_id":"01HBZ8QEXHS0YR4R1N6S1XGEE2","config":{"image":"busybox"}}"#;

fn json(status: &'static str, body: &str) -> (&'static str, &'static str, String) {
    (status, "application/json", body.to_owned())
}

#[tokio::test]
async fn machine_endpoints_use_flys_paths_and_bodies() {
    let (url, server) = serve(vec![
        json("200 OK", &format!("[{MACHINE}]")),
        json("200 OK", MACHINE),
        json("200 OK", MACHINE),
        json("200 OK", r#"{"ok":true}"#),
        json(
            "200 OK",
            r#"{"previous_state":"stopped","migrated":false,"new_host":""}"#,
        ),
        json("200 OK", r#"{"ok":true}"#),
        json("200 OK", ""),
        json("200 OK", r#"{"ok":true}"#),
        json(
            "200 OK",
            r#"{"exit_code":3,"exit_signal":0,"stdout":"hi\n","stderr":""}"#,
        ),
        json("200 OK", r#"{"ok":true}"#),
    ])
    .await;
    let client = Client::new(&url, "t").unwrap();
    let list = client
        .machines_list(
            "web",
            &ListMachinesParams {
                states: vec![aloft_api::MachineState::Started],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(list[0].id.as_str(), "3d8d413b29d089");
    let request = aloft_api::CreateMachineRequest {
        config: aloft_api::MachineConfig {
            image: Some("busybox".into()),
            ..Default::default()
        },
        region: Some("local".into()),
        ..Default::default()
    };
    let created = client.machine_create("web", &request).await.unwrap();
    assert_eq!(created.name, "web-1");
    let leased = client.with_lease_nonce(Some("n0nce"));
    leased
        .machine_update(
            "web",
            "3d8d413b29d089",
            &aloft_api::UpdateMachineRequest {
                config: request.config.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    client
        .machine_stop(
            "web",
            "3d8d413b29d089",
            &aloft_api::StopRequest {
                signal: Some(aloft_api::StopSignal::SIGTERM),
                timeout: Some(aloft_api::Duration::from_secs(5)),
            },
        )
        .await
        .unwrap();
    let started = client.machine_start("web", "3d8d413b29d089").await.unwrap();
    assert_eq!(started.previous_state, aloft_api::MachineState::Stopped);
    client
        .machine_restart(
            "web",
            "3d8d413b29d089",
            &RestartParams {
                signal: Some(aloft_api::StopSignal::SIGKILL),
                timeout: Some(std::time::Duration::from_secs(10)),
                force_stop: false,
            },
        )
        .await
        .unwrap();
    client
        .machine_signal("web", "3d8d413b29d089", aloft_api::Signal::SIGKILL)
        .await
        .unwrap();
    client
        .machine_delete("web", "3d8d413b29d089", true)
        .await
        .unwrap();
    let exec = client
        .machine_exec(
            "web",
            "3d8d413b29d089",
            &aloft_api::ExecRequest {
                command: vec!["echo".into(), "hi".into()],
                timeout: Some(5),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((exec.exit_code, exec.stdout.as_str()), (3, "hi\n"));
    client.machine_cordon("web", "3d8d413b29d089").await.unwrap();

    let requests = server.await.unwrap();
    let first_lines: Vec<&str> = requests.iter().map(|r| r.lines().next().unwrap()).collect();
    assert_eq!(
        first_lines,
        [
            "GET /v1/apps/web/machines?state=started HTTP/1.1",
            "POST /v1/apps/web/machines HTTP/1.1",
            "POST /v1/apps/web/machines/3d8d413b29d089 HTTP/1.1",
            "POST /v1/apps/web/machines/3d8d413b29d089/stop HTTP/1.1",
            "POST /v1/apps/web/machines/3d8d413b29d089/start HTTP/1.1",
            "POST /v1/apps/web/machines/3d8d413b29d089/restart?signal=SIGKILL&timeout=10s HTTP/1.1",
            "POST /v1/apps/web/machines/3d8d413b29d089/signal HTTP/1.1",
            "DELETE /v1/apps/web/machines/3d8d413b29d089?force=true HTTP/1.1",
            "POST /v1/apps/web/machines/3d8d413b29d089/exec HTTP/1.1",
            "POST /v1/apps/web/machines/3d8d413b29d089/cordon HTTP/1.1",
        ]
    );
    assert!(
        requests[1].ends_with(r#"{"config":{"image":"busybox"},"region":"local"}"#),
        "{}",
        requests[1]
    );
    // Only the leased client sends the nonce.
    assert!(
        requests[2]
            .to_ascii_lowercase()
            .contains("\r\nfly-machine-lease-nonce: n0nce\r\n"),
        "{}",
        requests[2]
    );
    assert!(
        !requests[3].to_ascii_lowercase().contains("lease-nonce"),
        "{}",
        requests[3]
    );
    assert!(
        requests[3].ends_with(r#"{"signal":"SIGTERM","timeout":"5s"}"#),
        "{}",
        requests[3]
    );
    assert!(
        requests[6].ends_with(r#"{"signal":"SIGKILL"}"#),
        "{}",
        requests[6]
    );
    assert!(
        requests[8].ends_with(r#"{"command":["echo","hi"],"timeout":5}"#),
        "{}",
        requests[8]
    );
}

#[tokio::test]
async fn lease_and_metadata_endpoints() {
    let lease = r#"{"status":"success","data":{"nonce":"abc","expires_at":1700000013,"owner":"me","description":"x","version":"01H"}}"#;
    let (url, server) = serve(vec![
        json("200 OK", lease),
        json("201 Created", lease),
        json("200 OK", ""),
        json("200 OK", r#"{"a":"1"}"#),
        json("200 OK", r#"{"value":"1"}"#),
        json("204 No Content", ""),
        json("204 No Content", ""),
        json(
            "404 Not Found",
            r#"{"error":"lease not found","status":"unknown"}"#,
        ),
    ])
    .await;
    let client = Client::new(&url, "t").unwrap();
    let id = "3d8d413b29d089";
    assert_eq!(client.lease_get("web", id).await.unwrap().data.nonce, "abc");
    let refreshed = client
        .with_lease_nonce(Some("abc"))
        .lease_create(
            "web",
            id,
            &aloft_api::CreateLeaseRequest {
                ttl: Some(13),
                description: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(refreshed.data.expires_at, 1_700_000_013);
    client.lease_release("web", id, "abc").await.unwrap();
    assert_eq!(client.metadata_get("web", id).await.unwrap()["a"], "1");
    assert_eq!(client.metadata_key_get("web", id, "a").await.unwrap(), "1");
    client.metadata_key_set("web", id, "a b", "2").await.unwrap();
    client.metadata_key_delete("web", id, "a").await.unwrap();
    let e = client.lease_get("web", id).await.unwrap_err();
    assert!(e.is_not_found(), "{e:?}");

    let requests = server.await.unwrap();
    let first_lines: Vec<&str> = requests.iter().map(|r| r.lines().next().unwrap()).collect();
    assert_eq!(
        first_lines,
        [
            "GET /v1/apps/web/machines/3d8d413b29d089/lease HTTP/1.1",
            "POST /v1/apps/web/machines/3d8d413b29d089/lease HTTP/1.1",
            "DELETE /v1/apps/web/machines/3d8d413b29d089/lease HTTP/1.1",
            "GET /v1/apps/web/machines/3d8d413b29d089/metadata HTTP/1.1",
            "GET /v1/apps/web/machines/3d8d413b29d089/metadata/a HTTP/1.1",
            "POST /v1/apps/web/machines/3d8d413b29d089/metadata/a%20b HTTP/1.1",
            "DELETE /v1/apps/web/machines/3d8d413b29d089/metadata/a HTTP/1.1",
            "GET /v1/apps/web/machines/3d8d413b29d089/lease HTTP/1.1",
        ]
    );
    assert!(
        requests[1]
            .to_ascii_lowercase()
            .contains("\r\nfly-machine-lease-nonce: abc\r\n")
    );
    assert!(requests[1].ends_with(r#"{"ttl":13}"#), "{}", requests[1]);
    assert!(
        requests[2]
            .to_ascii_lowercase()
            .contains("\r\nfly-machine-lease-nonce: abc\r\n")
    );
    assert!(requests[5].ends_with(r#"{"value":"2"}"#), "{}", requests[5]);
}

#[tokio::test]
async fn long_waits_repeat_on_408_and_short_ones_do_not() {
    let timeout = r#"{"error":"timed out waiting for machine to reach state started","status":"unknown"}"#;
    let (url, server) = serve(vec![
        json("408 Request Timeout", timeout),
        json(
            "200 OK",
            r#"{"ok":true,"state":"started","version":"01H","event_id":"01J"}"#,
        ),
        json("408 Request Timeout", timeout),
    ])
    .await;
    let client = Client::new(&url, "t").unwrap();
    let params = WaitParams {
        version: Some("01H".into()),
        ..WaitParams::state(aloft_api::WaitState::Started)
    };
    let reached = client
        .machine_wait_for(
            "web",
            "3d8d413b29d089",
            &params,
            std::time::Duration::from_secs(90),
        )
        .await
        .unwrap();
    assert_eq!(reached.state, aloft_api::MachineState::Started);
    // 30 s fit in one request: its 408 is the answer.
    let e = client
        .machine_wait_for(
            "web",
            "3d8d413b29d089",
            &params,
            std::time::Duration::from_secs(30),
        )
        .await
        .unwrap_err();
    assert!(e.is_wait_timeout(), "{e:?}");
    let requests = server.await.unwrap();
    let first_lines: Vec<&str> = requests.iter().map(|r| r.lines().next().unwrap()).collect();
    assert_eq!(
        first_lines,
        [
            "GET /v1/apps/web/machines/3d8d413b29d089/wait?state=started&timeout=60&version=01H HTTP/1.1",
            "GET /v1/apps/web/machines/3d8d413b29d089/wait?state=started&timeout=60&version=01H HTTP/1.1",
            "GET /v1/apps/web/machines/3d8d413b29d089/wait?state=started&timeout=30&version=01H HTTP/1.1",
        ]
    );
}

fn log_line(seq: u64, message: &str) -> String {
    serde_json::json!({
        "timestamp": "2026-12-02T07:00:00.000Z", "message": message, "level": "info",
        "instance": "3d8d413b29d089", "region": "local",
        "meta": {"event": {"provider": "app"}, "stream": "stdout"}, "seq": seq
    })
    .to_string()
}

#[tokio::test]
async fn logs_come_line_by_line() {
    let body = format!(
        "{}\n\n{}\n{}",
        log_line(1, "one"),
        log_line(2, "two"),
        log_line(3, "three")
    );
    let (url, server) = serve(vec![("200 OK", "application/x-ndjson", body)]).await;
    let client = Client::new(&url, "t").unwrap();
    let mut stream = client
        .logs(
            "web",
            &LogsQuery {
                instance: Some("3d8d413b29d089".into()),
                limit: Some(10),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(entry) = stream.next().await.unwrap() {
        got.push((entry.seq, entry.message));
    }
    assert_eq!(
        got,
        [
            (1, "one".to_owned()),
            (2, "two".to_owned()),
            (3, "three".to_owned())
        ]
    );
    let requests = server.await.unwrap();
    assert!(
        requests[0]
            .starts_with("GET /v1/apps/web/logs?instance=3d8d413b29d089&limit=10&follow=false HTTP/1.1\r\n"),
        "{}",
        requests[0]
    );
    assert!(
        requests[0]
            .to_ascii_lowercase()
            .contains("\r\naccept: application/x-ndjson\r\n")
    );
}

#[tokio::test]
async fn followed_logs_arrive_as_they_are_written() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let request = read_request(&mut conn).await;
        conn.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
        while let Some(chunk) = rx.recv().await {
            conn.write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes())
                .await
                .unwrap();
        }
        conn.write_all(b"0\r\n\r\n").await.unwrap();
        request
    });
    let client = Client::new(&url, "t").unwrap();
    let mut stream = client
        .logs(
            "web",
            &LogsQuery {
                follow: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // A line split across chunks, then a second one: each comes out as soon as it is whole.
    let line = format!("{}\n", log_line(7, "hello"));
    let (a, b) = line.split_at(20);
    tx.send(a.to_owned()).unwrap();
    tx.send(b.to_owned()).unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap().message, "hello");
    tx.send(format!("{}\n", log_line(8, "again"))).unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap().seq, 8);
    tx.send("not json\n".to_owned()).unwrap();
    let e = stream.next().await.unwrap_err();
    assert!(matches!(e, ClientError::Decode { status: 200, .. }), "{e:?}");
    drop(tx);
    assert!(
        server
            .await
            .unwrap()
            .starts_with("GET /v1/apps/web/logs?follow=true HTTP/1.1\r\n")
    );
}

const RELEASE: &str = r#"{"version":2,"app":"web","status":"pending","image":"r/web:deployment-1","strategy":"rolling","groups":[{"group":"app","config":{"image":"r/web:deployment-1"},"count":2}],"user":"admin","created_at":"2026-01-01T00:00:00Z"}"#;

#[tokio::test]
async fn release_endpoints_use_their_paths_and_stream_events() {
    let events = concat!(
        r#"{"seq":1,"timestamp":"2026-01-01T00:00:00.000Z","level":"info","message":"release v2 created","status":"pending"}"#,
        "\n\n",
        r#"{"seq":2,"timestamp":"2026-01-01T00:00:01.000Z","level":"info","machine":"3d8d413b29d089","message":"machine started","status":"complete"}"#,
        "\n"
    );
    let (url, server) = serve(vec![
        json("201 Created", RELEASE),
        json("200 OK", &format!("[{RELEASE}]")),
        json("200 OK", RELEASE),
        ("200 OK", "application/x-ndjson", events.to_owned()),
        json("201 Created", RELEASE),
        json("404 Not Found", r#"{"error":"release 9 not found"}"#),
    ])
    .await;
    let client = Client::new(&url, "t").unwrap();
    let request = aloft_api::CreateReleaseRequest {
        image: Some("r/web:deployment-1".into()),
        groups: vec![aloft_api::ReleaseGroup {
            group: "app".into(),
            config: aloft_api::MachineConfig {
                image: Some("r/web:deployment-1".into()),
                ..Default::default()
            },
            count: Some(2),
        }],
        ..Default::default()
    };
    let release = client.release_create("web", &request).await.unwrap();
    assert_eq!(release.version, 2);
    assert_eq!(release.status, aloft_api::ReleaseStatus::Pending);
    assert_eq!(client.releases_list("web").await.unwrap().len(), 1);
    assert_eq!(
        client.release_get("web", 2).await.unwrap().image,
        "r/web:deployment-1"
    );
    let mut stream = client.release_events("web", 2, true).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!((first.seq, first.machine.as_deref()), (1, None));
    let second = stream.next().await.unwrap().unwrap();
    assert_eq!(second.machine.as_deref(), Some("3d8d413b29d089"));
    assert!(second.status.is_final());
    assert!(stream.next().await.unwrap().is_none());
    let rollback = aloft_api::RollbackRequest { version: Some(1) };
    client.release_rollback("web", &rollback).await.unwrap();
    let e = client.release_get("web", 9).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");

    let requests = server.await.unwrap();
    let heads: Vec<&str> = requests.iter().map(|r| r.lines().next().unwrap()).collect();
    assert_eq!(
        heads,
        [
            "POST /v1/apps/web/releases HTTP/1.1",
            "GET /v1/apps/web/releases HTTP/1.1",
            "GET /v1/apps/web/releases/2 HTTP/1.1",
            "GET /v1/apps/web/releases/2/events?follow=true HTTP/1.1",
            "POST /v1/apps/web/releases/rollback HTTP/1.1",
            "GET /v1/apps/web/releases/9 HTTP/1.1",
        ]
    );
    let body = requests[0].split_once("\r\n\r\n").unwrap().1;
    let sent: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(sent["groups"][0]["count"], 2);
    assert_eq!(sent["strategy"], "rolling");
    assert!(requests[4].ends_with(r#"{"version":1}"#), "{}", requests[4]);
}

const VOLUME: &str = r#"{"id":"vol_4yx0jvqe1x1dj7gr","name":"data","state":"created","region":"local","zone":"host1","size_gb":1,"encrypted":false,"fstype":"ext4","created_at":"2026-01-01T00:00:00Z"}"#;

#[tokio::test]
async fn volume_endpoints_use_flys_paths_and_bodies() {
    let extended = VOLUME.replace(r#""size_gb":1"#, r#""size_gb":3"#);
    let destroyed = VOLUME.replace(r#""state":"created""#, r#""state":"destroyed""#);
    let (url, server) = serve(vec![
        json("200 OK", &format!("[{VOLUME}]")),
        json("200 OK", VOLUME),
        json("200 OK", VOLUME),
        json("200 OK", VOLUME),
        json(
            "200 OK",
            &format!(r#"{{"needs_restart":true,"volume":{extended}}}"#),
        ),
        json(
            "412 Precondition Failed",
            r#"{"error":"volume vol_4yx0jvqe1x1dj7gr is mounted by machine 3d8d413b29d089"}"#,
        ),
        json("200 OK", &destroyed),
    ])
    .await;
    let client = Client::new(&url, "t").unwrap();
    let id = "vol_4yx0jvqe1x1dj7gr";
    let list = client.volumes_list("web").await.unwrap();
    assert_eq!(list[0].id.as_str(), id);
    assert_eq!(list[0].state, aloft_api::VolumeState::Created);
    let created = client
        .volume_create(
            "web",
            &aloft_api::CreateVolumeRequest {
                name: "data".into(),
                size_gb: Some(1),
                encrypted: Some(false),
                region: Some("local".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(created.name, "data");
    assert_eq!(client.volume_get("web", id).await.unwrap().size_gb, 1);
    client
        .volume_update(
            "web",
            id,
            &aloft_api::UpdateVolumeRequest {
                snapshot_retention: Some(7),
                auto_backup_enabled: Some(false),
            },
        )
        .await
        .unwrap();
    let ext = client.volume_extend("web", id, 3).await.unwrap();
    assert!(ext.needs_restart);
    assert_eq!(ext.volume.size_gb, 3);
    let e = client.volume_delete("web", id).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Api { status: 412, message } if message.contains("3d8d413b29d089")),
        "{e:?}"
    );
    let gone = client.volume_delete("web", id).await.unwrap();
    assert_eq!(gone.state, aloft_api::VolumeState::Destroyed);

    let requests = server.await.unwrap();
    let heads: Vec<&str> = requests.iter().map(|r| r.lines().next().unwrap()).collect();
    assert_eq!(
        heads,
        [
            "GET /v1/apps/web/volumes HTTP/1.1",
            "POST /v1/apps/web/volumes HTTP/1.1",
            "GET /v1/apps/web/volumes/vol_4yx0jvqe1x1dj7gr HTTP/1.1",
            "PUT /v1/apps/web/volumes/vol_4yx0jvqe1x1dj7gr HTTP/1.1",
            "PUT /v1/apps/web/volumes/vol_4yx0jvqe1x1dj7gr/extend HTTP/1.1",
            "DELETE /v1/apps/web/volumes/vol_4yx0jvqe1x1dj7gr HTTP/1.1",
            "DELETE /v1/apps/web/volumes/vol_4yx0jvqe1x1dj7gr HTTP/1.1",
        ]
    );
    let body = |i: usize| -> serde_json::Value {
        serde_json::from_str(requests[i].split_once("\r\n\r\n").unwrap().1).unwrap()
    };
    assert_eq!(
        body(1),
        serde_json::json!({"name": "data", "region": "local", "size_gb": 1, "encrypted": false})
    );
    assert_eq!(
        body(3),
        serde_json::json!({"auto_backup_enabled": false, "snapshot_retention": 7})
    );
    assert_eq!(body(4), serde_json::json!({"size_gb": 3}));
}

const SNAPSHOT: &str = r#"{"id":"vs_2b6lx0rq8ejzd3ky","created_at":"2026-01-02T00:00:00Z","digest":"sha256:00","retention_days":5,"size":1048576,"status":"created","volume_size":1073741824}"#;

#[tokio::test]
async fn snapshots_restores_and_forks_use_flys_paths_and_bodies() {
    let older = SNAPSHOT
        .replace("vs_2b6lx0rq8ejzd3ky", "vs_0000000000000000")
        .replace("2026-01-02", "2026-01-01");
    let (url, server) = serve(vec![
        json("200 OK", SNAPSHOT),
        json("200 OK", &format!("[{SNAPSHOT},{older}]")),
        json("200 OK", VOLUME),
        json("200 OK", VOLUME),
        json(
            "404 Not Found",
            r#"{"error":"snapshot vs_0000000000000001 not found"}"#,
        ),
    ])
    .await;
    let client = Client::new(&url, "t").unwrap();
    let id = "vol_4yx0jvqe1x1dj7gr";
    let taken = client.create_volume_snapshot("web", id).await.unwrap();
    assert_eq!(taken.id.as_str(), "vs_2b6lx0rq8ejzd3ky");
    assert_eq!(taken.size, 1_048_576);
    assert_eq!(taken.volume_size, 1 << 30);
    assert_eq!(taken.retention_days, 5);
    assert_eq!(taken.status, aloft_api::SNAPSHOT_CREATED);
    let listed = client.volume_snapshots("web", id).await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["vs_2b6lx0rq8ejzd3ky", "vs_0000000000000000"]);
    let restore = aloft_api::CreateVolumeRequest {
        name: "data".into(),
        snapshot_id: Some("vs_2b6lx0rq8ejzd3ky".into()),
        encrypted: Some(false),
        ..Default::default()
    };
    assert_eq!(client.volume_create("web", &restore).await.unwrap().name, "data");
    let fork = aloft_api::CreateVolumeRequest {
        name: "copy".into(),
        source_volume_id: Some(id.into()),
        ..Default::default()
    };
    client.volume_create("web", &fork).await.unwrap();
    let e = client
        .volume_create(
            "web",
            &aloft_api::CreateVolumeRequest {
                snapshot_id: Some("vs_0000000000000001".into()),
                ..restore.clone()
            },
        )
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    assert!(
        e.to_string().contains("snapshot vs_0000000000000001 not found"),
        "{e}"
    );

    let requests = server.await.unwrap();
    let heads: Vec<&str> = requests.iter().map(|r| r.lines().next().unwrap()).collect();
    assert_eq!(
        heads,
        [
            "POST /v1/apps/web/volumes/vol_4yx0jvqe1x1dj7gr/snapshots HTTP/1.1",
            "GET /v1/apps/web/volumes/vol_4yx0jvqe1x1dj7gr/snapshots HTTP/1.1",
            "POST /v1/apps/web/volumes HTTP/1.1",
            "POST /v1/apps/web/volumes HTTP/1.1",
            "POST /v1/apps/web/volumes HTTP/1.1",
        ]
    );
    // Taking a snapshot sends no body.
    assert_eq!(requests[0].split_once("\r\n\r\n").unwrap().1, "");
    let body = |i: usize| -> serde_json::Value {
        serde_json::from_str(requests[i].split_once("\r\n\r\n").unwrap().1).unwrap()
    };
    assert_eq!(
        body(2),
        serde_json::json!({"name": "data", "encrypted": false, "snapshot_id": "vs_2b6lx0rq8ejzd3ky"})
    );
    assert_eq!(
        body(3),
        serde_json::json!({"name": "copy", "source_volume_id": "vol_4yx0jvqe1x1dj7gr"})
    );
}

/// The console request upgrades; frames then flow both ways on the same connection.
#[tokio::test]
async fn console_upgrades_and_exchanges_frames() {
    use aloft_api::{ConsoleExit, ConsoleFrame, ConsoleRequest, TtySize};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let request = read_request(&mut conn).await;
        conn.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: aloft-console\r\n\r\n",
        )
        .await
        .unwrap();
        // The server's side: one stdin frame in, its bytes out, then the exit.
        let mut buf = Vec::new();
        let frame = loop {
            if let Some((f, _)) = ConsoleFrame::decode(&buf).unwrap() {
                break f;
            }
            let mut chunk = [0u8; 256];
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "client closed before sending a frame");
            buf.extend_from_slice(&chunk[..n]);
        };
        let ConsoleFrame::Stdin(data) = frame else {
            panic!("not stdin: {frame:?}");
        };
        let mut out = Vec::new();
        ConsoleFrame::Stdout(data).encode(&mut out);
        ConsoleFrame::Exit(ConsoleExit {
            exit_code: Some(7),
            signal: None,
        })
        .encode(&mut out);
        conn.write_all(&out).await.unwrap();
        conn.shutdown().await.unwrap();
        request
    });
    let client = Client::new(&url, "tok").unwrap().with_lease_nonce(Some("n1"));
    let req = ConsoleRequest {
        argv: vec!["sh".into(), "-c".into(), "echo a b".into()],
        tty: Some(TtySize { rows: 30, cols: 90 }),
        env: vec![("TERM".into(), "xterm".into())],
        user: Some("root".into()),
    };
    let (mut reader, mut writer) = client
        .console("web", "3d8d413b29d089", &req)
        .await
        .unwrap()
        .split();
    writer
        .send(&ConsoleFrame::Stdin(b"hello".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        reader.next().await.unwrap(),
        Some(ConsoleFrame::Stdout(b"hello".to_vec()))
    );
    let Some(ConsoleFrame::Exit(exit)) = reader.next().await.unwrap() else {
        panic!("no exit");
    };
    assert_eq!(exit.status(), 7);
    assert_eq!(reader.next().await.unwrap(), None);

    let request = server.await.unwrap();
    let lower = request.to_ascii_lowercase();
    assert!(
        request.starts_with(
            "GET /v1/apps/web/machines/3d8d413b29d089/console?cmd=sh&cmd=-c&cmd=echo%20a%20b&tty=true&rows=30&cols=90&term=xterm&user=root HTTP/1.1\r\n"
        ),
        "{request}"
    );
    for header in [
        "\r\nconnection: upgrade\r\n",
        "\r\nupgrade: aloft-console\r\n",
        "\r\nauthorization: bearer tok\r\n",
        "\r\nfly-machine-lease-nonce: n1\r\n",
    ] {
        assert!(lower.contains(header), "{header:?} in {request}");
    }
}

/// Refusals before the upgrade are API errors with the server's message; a 200 is no console.
#[tokio::test]
async fn console_refusals_are_api_errors() {
    let (url, _server) = serve(vec![
        json(
            "412 Precondition Failed",
            r#"{"error":"machine 3d8d413b29d089 is not started (stopped)"}"#,
        ),
        json("404 Not Found", r#"{"error":"machine nope not found"}"#),
        json("200 OK", "{}"),
    ])
    .await;
    let client = Client::new(&url, "t").unwrap();
    let req = aloft_api::ConsoleRequest::default();
    let e = client.console("web", "3d8d413b29d089", &req).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Api { status: 412, message } if message == "machine 3d8d413b29d089 is not started (stopped)"),
        "{e:?}"
    );
    let e = client.console("web", "nope", &req).await.unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    let e = client.console("web", "x", &req).await.unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Upgrade {
                status: 200,
                protocol: "aloft-console",
                ..
            }
        ),
        "{e:?}"
    );
}

/// The proxy request upgrades to `aloft-tcp`; the raw bytes then flow both ways, and each side's
/// end of stream reaches the other as a half-close: the server reads the client's bytes to
/// their end and only then answers, on the direction still open.
#[tokio::test]
async fn proxy_upgrades_and_carries_raw_bytes_with_half_close() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let request = read_request(&mut conn).await;
        conn.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: aloft-tcp\r\n\r\n",
        )
        .await
        .unwrap();
        // Greets first (a server-speaks-first protocol), then reads to the client's end.
        conn.write_all(b"hello\n").await.unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.unwrap();
        let mut reply = b"got ".to_vec();
        reply.extend_from_slice(&got);
        conn.write_all(&reply).await.unwrap();
        conn.shutdown().await.unwrap();
        request
    });
    let client = Client::new(&url, "tok").unwrap();
    let mut stream = client.proxy("web", "3d8d413b29d089", 5432).await.unwrap();
    let mut greeting = [0u8; 6];
    stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"hello\n");
    // Bytes that are not UTF-8, or HTTP, or frames: passed on as they are.
    let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    stream.write_all(&payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    // A half-close that does not reach the server would leave both sides waiting.
    tokio::time::timeout(std::time::Duration::from_secs(20), stream.read_to_end(&mut rest))
        .await
        .expect("the server saw the end of the client's stream")
        .unwrap();
    assert_eq!(&rest[..4], b"got ");
    assert!(rest[4..] == payload[..], "{} bytes back", rest.len() - 4);

    let request = server.await.unwrap();
    assert!(
        request.starts_with("GET /v1/apps/web/machines/3d8d413b29d089/proxy?port=5432 HTTP/1.1\r\n"),
        "{request}"
    );
    let lower = request.to_ascii_lowercase();
    for header in [
        "\r\nconnection: upgrade\r\n",
        "\r\nupgrade: aloft-tcp\r\n",
        "\r\nauthorization: bearer tok\r\n",
    ] {
        assert!(lower.contains(header), "{header:?} in {request}");
    }
}

/// Refusals before the upgrade are API errors with the server's status and message; a 200 is
/// no upgrade, and says which one was asked for.
#[tokio::test]
async fn proxy_refusals_are_api_errors() {
    let (url, server) = serve(vec![
        json(
            "502 Bad Gateway",
            r#"{"error":"machine 3d8d413b29d089 refused a connection to port 5432"}"#,
        ),
        json(
            "412 Precondition Failed",
            r#"{"error":"machine 3d8d413b29d089 is not started (stopped)"}"#,
        ),
        json("404 Not Found", r#"{"error":"machine nope not found"}"#),
        json(
            "503 Service Unavailable",
            r#"{"error":"too many proxied connections"}"#,
        ),
        json("200 OK", "{}"),
    ])
    .await;
    let client = Client::new(&url, "t").unwrap();
    let e = client.proxy("web", "3d8d413b29d089", 5432).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Api { status: 502, message } if message == "machine 3d8d413b29d089 refused a connection to port 5432"),
        "{e:?}"
    );
    let e = client.proxy("web", "3d8d413b29d089", 1).await.unwrap_err();
    assert_eq!(e.status(), Some(412), "{e:?}");
    let e = client.proxy("web", "nope", 1).await.unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    let e = client.proxy("web", "x", 65535).await.unwrap_err();
    assert_eq!(e.status(), Some(503), "{e:?}");
    let e = client.proxy("web", "x", 80).await.unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Upgrade {
                status: 200,
                protocol: "aloft-tcp",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("aloft-tcp"), "{e}");
    let requests = server.await.unwrap();
    assert!(
        requests[3].starts_with("GET /v1/apps/web/machines/x/proxy?port=65535 HTTP/1.1\r\n"),
        "{}",
        requests[3]
    );
}
