//! The API router in process (tower `oneshot`, no socket): every apps endpoint, auth, and the
//! status codes and Fly-shaped bodies of every error.

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use aloft_control::{ApiConfig, ApiState, create_token, router};
    use aloft_store::{ControlStore, SqliteStore, TokenRecord};
    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use http_body_util::BodyExt as _;
    use serde_json::Value;
    use tower::ServiceExt as _;

    struct Api {
        _dir: tempfile::TempDir,
        state: ApiState,
        /// An admin token of `personal`.
        token: String,
        /// A token of organization `acme`.
        acme: String,
    }

    impl Api {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(dir.path().join("control.db")).unwrap();
            let state = ApiState::new(
                Arc::new(store),
                ApiConfig {
                    region: "test".into(),
                    access_log: false,
                },
            );
            let token = create_token(state.control(), "personal", "admin").unwrap().token;
            let acme = create_token(state.control(), "acme", "ci").unwrap().token;
            Self {
                _dir: dir,
                state,
                token,
                acme,
            }
        }

        fn control(&self) -> &ControlStore {
            self.state.control()
        }

        /// Sends a request; `auth` is the whole `Authorization` value.
        async fn send(
            &self,
            method: &str,
            uri: &str,
            auth: Option<&str>,
            body: Option<&str>,
        ) -> (StatusCode, Value, axum::http::HeaderMap) {
            let mut req = Request::builder().method(method).uri(uri);
            if let Some(auth) = auth {
                req = req.header(header::AUTHORIZATION, auth);
            }
            let req = match body {
                Some(b) => req
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(b.to_owned())),
                None => req.body(Body::empty()),
            }
            .unwrap();
            let resp = router(self.state.clone()).oneshot(req).await.unwrap();
            let status = resp.status();
            let headers = resp.headers().clone();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                    panic!(
                        "{method} {uri}: body is not JSON ({e}): {:?}",
                        String::from_utf8_lossy(&bytes)
                    )
                })
            };
            (status, value, headers)
        }

        async fn call(&self, method: &str, uri: &str, body: Option<&str>) -> (StatusCode, Value) {
            let auth = format!("Bearer {}", self.token);
            let (s, v, _) = self.send(method, uri, Some(&auth), body).await;
            (s, v)
        }

        async fn as_acme(&self, method: &str, uri: &str, body: Option<&str>) -> (StatusCode, Value) {
            let auth = format!("Bearer {}", self.acme);
            let (s, v, _) = self.send(method, uri, Some(&auth), body).await;
            (s, v)
        }
    }

    /// A Fly error body with the given status code whose message contains `needle`.
    #[track_caller]
    fn assert_error(got: (StatusCode, Value), status: u16, needle: &str) {
        assert_error_status(got, status, needle, "unknown");
    }

    /// … and whose machine-readable `status` is `code`.
    #[track_caller]
    fn assert_error_status(got: (StatusCode, Value), status: u16, needle: &str, code: &str) {
        let (s, body) = got;
        assert_eq!(s.as_u16(), status, "{body}");
        let msg = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error text in {body}"));
        assert!(msg.contains(needle), "{msg:?} does not contain {needle:?}");
        assert_eq!(body["status"], code, "{body}");
    }

    #[tokio::test]
    async fn create_get_list_delete() {
        let api = Api::new();
        let (s, app) = api
            .call(
                "POST",
                "/v1/apps?wait=true",
                Some(r#"{"name": "web", "org_slug": "personal", "network": "", "app_role_id": ""}"#),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{app}");
        assert_eq!(app["name"], "web");
        assert_eq!(app["id"], "web");
        assert_eq!(app["network"], "default");
        assert_eq!(app["status"], "pending");
        assert_eq!(app["machine_count"], 0);
        assert_eq!(app["volume_count"], 0);
        assert_eq!(app["organization"]["slug"], "personal");
        let numeric = app["internal_numeric_id"].as_u64().unwrap();
        assert!(
            (1..=u64::from(i32::MAX.unsigned_abs())).contains(&numeric),
            "fly-go reads an int32: {numeric}"
        );

        let (s, got) = api.call("GET", "/v1/apps/web", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(got, app);

        // org_slug defaults to the token's organization; network is kept.
        let (s, other) = api
            .call(
                "POST",
                "/v1/apps",
                Some(r#"{"name": "api-2", "network": "backend"}"#),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{other}");
        assert_eq!(other["organization"]["slug"], "personal");
        assert_eq!(other["network"], "backend");

        let (s, list) = api.call("GET", "/v1/apps?org_slug=personal", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(list["total_apps"], 2);
        let names: Vec<&str> = list["apps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["api-2", "web"]);

        let (s, body) = api.call("DELETE", "/v1/apps/web", None).await;
        assert_eq!(s, StatusCode::ACCEPTED);
        assert_eq!(body, Value::Null);
        assert_error(api.call("GET", "/v1/apps/web", None).await, 404, "app not found");
        assert_error(
            api.call("DELETE", "/v1/apps/web", None).await,
            404,
            "app not found",
        );
        let (_, list) = api.call("GET", "/v1/apps?org_slug=personal", None).await;
        assert_eq!(list["total_apps"], 1);
    }

    #[tokio::test]
    async fn list_filters_by_org_and_role() {
        let api = Api::new();
        api.call(
            "POST",
            "/v1/apps",
            Some(r#"{"name": "a", "app_role_id": "builder"}"#),
        )
        .await;
        api.call("POST", "/v1/apps", Some(r#"{"name": "b"}"#)).await;
        let (s, _) = api
            .as_acme("POST", "/v1/apps", Some(r#"{"name": "c", "org_slug": "acme"}"#))
            .await;
        assert_eq!(s, StatusCode::CREATED);
        let (_, list) = api
            .call("GET", "/v1/apps?org_slug=personal&limit=5000", None)
            .await;
        assert_eq!(list["total_apps"], 2);
        let (_, list) = api
            .call("GET", "/v1/apps?org_slug=personal&app_role=builder", None)
            .await;
        assert_eq!(list["total_apps"], 1);
        assert_eq!(list["apps"][0]["name"], "a");
        let (_, list) = api.as_acme("GET", "/v1/apps?org_slug=acme", None).await;
        assert_eq!(list["apps"][0]["name"], "c");
        assert_error(
            api.call("GET", "/v1/apps", None).await,
            400,
            "org_slug is required",
        );
    }

    #[tokio::test]
    async fn taken_names_are_422_across_orgs() {
        let api = Api::new();
        let body = r#"{"name": "web", "org_slug": "personal"}"#;
        assert_eq!(
            api.call("POST", "/v1/apps", Some(body)).await.0,
            StatusCode::CREATED
        );
        assert_error_status(
            api.call("POST", "/v1/apps", Some(body)).await,
            422,
            "Name has already been taken",
            "name_taken",
        );
        // App names are one namespace: another organization cannot take it either.
        assert_error_status(
            api.as_acme("POST", "/v1/apps", Some(r#"{"name": "web", "org_slug": "acme"}"#))
                .await,
            422,
            "Name has already been taken",
            "name_taken",
        );
    }

    #[tokio::test]
    async fn other_orgs_get_403() {
        let api = Api::new();
        api.call("POST", "/v1/apps", Some(r#"{"name": "web"}"#)).await;
        // A name taken by another organization reads as 403 (fly-go: taken), a free one as 404,
        // worded exactly as older fly-go compares them.
        let (s, body) = api.as_acme("GET", "/v1/apps/web", None).await;
        assert_eq!((s.as_u16(), body["error"].as_str()), (403, Some("unauthorized")));
        let (s, body) = api.as_acme("GET", "/v1/apps/free", None).await;
        assert_eq!((s.as_u16(), body["error"].as_str()), (404, Some("app not found")));
        assert_error(
            api.as_acme("GET", "/v1/apps/free", None).await,
            404,
            "app not found",
        );
        assert_error(
            api.as_acme("DELETE", "/v1/apps/web", None).await,
            403,
            "unauthorized",
        );
        assert_error(
            api.as_acme("GET", "/v1/apps?org_slug=personal", None).await,
            403,
            "organization \"acme\"",
        );
        assert_error(
            api.as_acme(
                "POST",
                "/v1/apps",
                Some(r#"{"name": "x", "org_slug": "personal"}"#),
            )
            .await,
            403,
            "unauthorized",
        );
        // Still there.
        assert_eq!(api.call("GET", "/v1/apps/web", None).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn missing_and_bad_tokens_are_401() {
        let api = Api::new();
        let cases = [
            (None, "missing Authorization header"),
            (Some("Basic dXNlcjpwYXNz"), "malformed Authorization header"),
            (Some("Bearer"), "malformed Authorization header"),
            (Some("Bearer nope"), "invalid token"),
            (Some("FlyV1 fm2_abc,fm2_def"), "invalid token"),
        ];
        for (auth, needle) in cases {
            for (method, uri) in [
                ("GET", "/v1/apps?org_slug=personal"),
                ("GET", "/v1/apps/web"),
                ("GET", "/v1/nowhere"),
            ] {
                let (s, body, headers) = api.send(method, uri, auth, None).await;
                assert_error((s, body), 401, needle);
                assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
            }
        }
        // A tampered secret.
        let mut tampered = api.token.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == '0' { '1' } else { '0' });
        let (s, body, _) = api
            .send(
                "GET",
                "/v1/apps?org_slug=personal",
                Some(&format!("Bearer {tampered}")),
                None,
            )
            .await;
        assert_error((s, body), 401, "invalid token");
    }

    #[tokio::test]
    async fn flyv1_and_token_lists_work() {
        let api = Api::new();
        for auth in [
            format!("FlyV1 {}", api.token),
            format!("FlyV1 fm2_unknown,{}", api.token),
            format!("bearer {}", api.token),
            format!("Bearer FlyV1 {}", api.token),
        ] {
            let (s, body, _) = api
                .send("GET", "/v1/apps?org_slug=personal", Some(&auth), None)
                .await;
            assert_eq!(s, StatusCode::OK, "{auth}: {body}");
        }
    }

    #[tokio::test]
    async fn expired_tokens_are_401() {
        let api = Api::new();
        let fresh = create_token(api.control(), "personal", "short").unwrap();
        api.control().delete_token(&fresh.record.id).unwrap();
        let record = TokenRecord {
            expires_at_ms: Some(1),
            ..fresh.record
        };
        api.control().create_token(&record).unwrap();
        let (s, body, _) = api
            .send(
                "GET",
                "/v1/apps?org_slug=personal",
                Some(&format!("Bearer {}", fresh.token)),
                None,
            )
            .await;
        assert_error((s, body), 401, "token expired");
    }

    #[tokio::test]
    async fn malformed_bodies_are_400_naming_the_field() {
        let api = Api::new();
        let cases = [
            (r#"{"name": 5}"#, "\"name\""),
            (r#"{"name": "ok", "org_slug": ["personal"]}"#, "\"org_slug\""),
            (
                r#"{"name": "ok", "enable_subdomains": "yes"}"#,
                "\"enable_subdomains\"",
            ),
            (r#"{"name": "ok", "network": 1}"#, "\"network\""),
            ("{\"name\": ", "invalid request body"),
            ("[]", "invalid request body"),
            (" [1, 2]", "an array where a JSON object {…} belongs"),
            ("", "request body is empty"),
            (r#"{"org_slug": "personal"}"#, "name is required"),
            (r#"{"name": "Web_App"}"#, "invalid app name"),
            (r#"{"name": "web", "network": "Bad Net"}"#, "invalid network"),
            (r#"{"name": "web", "org_slug": "  "}"#, ""),
        ];
        for (body, needle) in cases {
            let got = api.call("POST", "/v1/apps", Some(body)).await;
            if needle.is_empty() {
                // A blank org_slug means the token's organization.
                assert_eq!(got.0, StatusCode::CREATED, "{body}: {}", got.1);
                continue;
            }
            assert_error(got, 400, needle);
        }
        // Not JSON at all.
        let req = Request::builder()
            .method("POST")
            .uri("/v1/apps")
            .header(header::AUTHORIZATION, format!("Bearer {}", api.token))
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from("name=web"))
            .unwrap();
        let resp = router(api.state.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), 415);
        let body: Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert!(body["error"].as_str().unwrap().contains("application/json"));
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_are_json() {
        let api = Api::new();
        assert_error(
            api.call("GET", "/v1/nowhere", None).await,
            404,
            "no route for GET /v1/nowhere",
        );
        assert_error(api.call("GET", "/", None).await, 404, "no route");
        assert_error(
            api.call("PUT", "/v1/apps", None).await,
            405,
            "method PUT is not allowed",
        );
        // Names that cannot be app names cannot exist.
        assert_error(
            api.call("GET", "/v1/apps/Not_An_App", None).await,
            404,
            "app not found",
        );
        assert_error(
            api.call("GET", "/v1/apps/%FF", None).await,
            400,
            "invalid app name",
        );
        assert_error(
            api.call("DELETE", &format!("/v1/apps/{}", "a".repeat(200)), None)
                .await,
            404,
            "app not found",
        );
    }

    #[tokio::test]
    async fn responses_carry_a_request_id() {
        let api = Api::new();
        let (_, _, ok) = api
            .send(
                "GET",
                "/v1/apps?org_slug=personal",
                Some(&format!("Bearer {}", api.token)),
                None,
            )
            .await;
        let (_, _, unauthenticated) = api.send("GET", "/v1/apps", None, None).await;
        for headers in [ok, unauthenticated] {
            let id = headers["fly-request-id"].to_str().unwrap();
            let (ulid, region) = id.split_once('-').unwrap();
            assert_eq!(ulid.len(), 26, "{id}");
            assert_eq!(region, "test");
        }
    }
}
