//! docs/openapi.json cannot drift from the server: every response example in it is replayed
//! against the real server (as its `x-replay` says), checking the status, the body's shape and
//! literal values, and the schema; every route the router serves is in it and every path in it
//! answers; and schemathesis (PyPI) fuzzes a live server with it: no 5xx, no answer the document
//! does not describe, no error in the document.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{api_token, desk_session};
use crate::metrics::{client, start_server};

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

/// The kind of a JSON value, as JSON Schema's `type` names it (an integer is also a number).
fn kinds(v: &Value) -> &'static [&'static str] {
    match v {
        Value::Null => &["null"],
        Value::Bool(_) => &["boolean"],
        Value::Number(n) if n.is_i64() || n.is_u64() => &["integer", "number"],
        Value::Number(_) => &["number"],
        Value::String(_) => &["string"],
        Value::Array(_) => &["array"],
        Value::Object(_) => &["object"],
    }
}

/// The subset of JSON Schema the document uses: `$ref`, `type`, `const`, `enum`, `properties`,
/// `required`, `additionalProperties: false`.
fn validate(v: &Value, schema: &Value, doc: &Value, at: &str) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("{at}: $ref {r}"));
        let target = &doc["components"]["schemas"][name];
        assert!(target.is_object(), "{at}: no schema {name}");
        return validate(v, target, doc, at);
    }
    if let Some(c) = schema.get("const") {
        assert_eq!(v, c, "{at}: const");
    }
    if let Some(e) = schema.get("enum") {
        assert!(e.as_array().unwrap().contains(v), "{at}: {v} is not one of {e}");
    }
    if let Some(t) = schema.get("type") {
        let allowed: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().map(|x| x.as_str().unwrap()).collect(),
            _ => panic!("{at}: type {t}"),
        };
        assert!(kinds(v).iter().any(|k| allowed.contains(k)), "{at}: {v} is not of type {t}");
    }
    if let Some(obj) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for r in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            assert!(obj.contains_key(r.as_str().unwrap()), "{at}: required {r} missing in {v}");
        }
        for (k, x) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(x, s, doc, &format!("{at}.{k}")),
                None => assert!(schema.get("additionalProperties") != Some(&json!(false)), "{at}: unexpected key {k}"),
            }
        }
    }
}

/// The real body has the example's shape: the same keys, values of the same kind, and the same
/// strings, except those in which the example writes `…` (free text, tokens).
fn same_shape(example: &Value, real: &Value, at: &str) {
    match (example, real) {
        (Value::Object(e), Value::Object(r)) => {
            let (ek, rk): (BTreeSet<&String>, BTreeSet<&String>) = (e.keys().collect(), r.keys().collect());
            assert_eq!(ek, rk, "{at}: keys of {real}");
            for (k, x) in e {
                same_shape(x, &r[k], &format!("{at}.{k}"));
            }
        }
        (Value::String(e), Value::String(r)) if !e.contains('…') => assert_eq!(e, r, "{at}"),
        (e, r) => assert_eq!(kinds(e)[0], kinds(r)[0], "{at}: {r} where the example has {e}"),
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn openapi_examples_replay_against_the_real_server(pool: PgPool) {
    let doc: Value = serde_json::from_str(callrecon::serve::OPENAPI).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");

    let (base, stop, task) = start_server(&pool).await;
    let max_body = 4096; // start_server's --max-body
    let http = client();
    let roles = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let poster = callrecon::users::add(&pool, "acme-crm", &roles(&["AsyncMetaData"])).await.unwrap();
    let viewer = callrecon::users::add(&pool, "viewer", &roles(&[])).await.unwrap();
    let (poster_token, viewer_token) = (
        api_token(&http, &base, &poster.client_id, &poster.client_secret).await,
        api_token(&http, &base, &viewer.client_id, &viewer.client_secret).await,
    );

    let mut request_examples: BTreeSet<(String, String)> = BTreeSet::new();
    let mut used: BTreeSet<(String, String)> = BTreeSet::new();
    let mut replayed = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let request = op["requestBody"]["content"].as_object().and_then(|c| c.iter().next());
            if let Some((_, media)) = request {
                for name in media["examples"].as_object().into_iter().flat_map(|e| e.keys()) {
                    request_examples.insert((path.clone(), name.clone()));
                }
            }
            for (status, response) in op["responses"].as_object().unwrap() {
                let Some(content) = response["content"].as_object() else { continue };
                for (content_type, media) in content {
                    for (name, example) in media["examples"].as_object().into_iter().flatten() {
                        let at = format!("{method} {path} {status} {name}");
                        let replay = &example["x-replay"];
                        assert!(replay.is_object(), "{at}: no x-replay");
                        let mut req = http.request(method.to_uppercase().parse().unwrap(), format!("{base}{path}"));
                        let wrong = "wrong-secret".to_owned();
                        let form_credentials = match replay["auth"].as_str().unwrap() {
                            "none" => None,
                            "basic" => {
                                req = req.basic_auth(&poster.client_id, Some(&poster.client_secret));
                                None
                            }
                            "basic-wrong-secret" => {
                                req = req.basic_auth(&poster.client_id, Some(&wrong));
                                None
                            }
                            "form" => Some((&poster.client_id, &poster.client_secret)),
                            "bearer" => {
                                req = req.bearer_auth(&poster_token);
                                None
                            }
                            "bearer-no-role" => {
                                req = req.bearer_auth(&viewer_token);
                                None
                            }
                            "bearer-unknown" => {
                                req = req.bearer_auth("kQ8vNoSuchToken");
                                None
                            }
                            other => panic!("{at}: auth {other}"),
                        };
                        for (h, v) in replay["headers"].as_object().into_iter().flatten() {
                            req = req.header(h, v.as_str().unwrap());
                        }
                        if let Some(request_name) = replay["request"].as_str() {
                            used.insert((path.clone(), request_name.to_owned()));
                            let (request_type, request_media) =
                                request.unwrap_or_else(|| panic!("{at}: no request body"));
                            let value = &request_media["examples"][request_name]["value"];
                            assert!(!value.is_null(), "{at}: no request example {request_name}");
                            if request_type == "application/x-www-form-urlencoded" {
                                let mut fields: Vec<(String, String)> = value
                                    .as_object()
                                    .unwrap()
                                    .iter()
                                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                                    .collect();
                                if let Some((id, secret)) = form_credentials {
                                    for (k, v) in &mut fields {
                                        match k.as_str() {
                                            "client_id" => *v = id.clone(),
                                            "client_secret" => *v = secret.clone(),
                                            _ => {}
                                        }
                                    }
                                }
                                req = req.form(&fields);
                            } else {
                                req = req.header("content-type", request_type.as_str()).body(value.to_string());
                            }
                        }
                        if replay["oversized"] == true {
                            req = req.header("content-type", "application/json").body("x".repeat(max_body + 1));
                        }
                        let refuse = replay["database"] == "refuses-inserts";
                        if refuse {
                            sqlx::raw_sql(
                                "create function refuse() returns trigger language plpgsql as $$
                                 begin raise exception 'event_queue is read-only for this example'; end $$;
                                 create trigger refuse before insert on event_queue for each row execute function refuse();",
                            )
                            .execute(&pool)
                            .await
                            .unwrap();
                        } else if let Some(other) = replay.get("database") {
                            panic!("{at}: database {other}");
                        }

                        let resp = req.send().await.unwrap();
                        let real_status = resp.status().as_u16().to_string();
                        let text = resp.text().await.unwrap();
                        if refuse {
                            sqlx::raw_sql("drop trigger refuse on event_queue; drop function refuse();")
                                .execute(&pool)
                                .await
                                .unwrap();
                        }
                        assert_eq!(&real_status, status, "{at}: {text}");
                        let expected = &example["value"];
                        if content_type == "application/json" {
                            let real: Value =
                                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{at}: {e}: {text}"));
                            if replay["whole-document"] == true {
                                assert_eq!(real, doc, "{at}");
                            } else {
                                same_shape(expected, &real, &at);
                            }
                            validate(expected, &media["schema"], &doc, &format!("{at} (example)"));
                            validate(&real, &media["schema"], &doc, &at);
                        } else {
                            for line in expected.as_str().unwrap().lines().filter(|l| l.starts_with("# TYPE ")) {
                                assert!(text.contains(line), "{at}: {line:?} not in\n{text}");
                            }
                        }
                        replayed.push(at);
                    }
                }
            }
        }
    }
    let unused: Vec<_> = request_examples.difference(&used).collect();
    assert!(unused.is_empty(), "request examples no response example replays: {unused:?}");
    // Every path and operation has examples: a document without them would replay nothing.
    assert!(replayed.len() >= 19, "{replayed:#?}");
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// The routes the router serves, as (method, path) in the document's spelling: read from the
/// router's source (`.route(PATH, get(..).post(..))` in src/serve/mod.rs and the desk's), so a
/// route added there must be added to the document too.
fn served_routes() -> BTreeSet<(String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let constants = [
        ("EVENT_PATH", callrecon::serve::EVENT_PATH),
        ("MASTER_CALL_PATH", callrecon::serve::MASTER_CALL_PATH),
        ("CASE_PATH", callrecon::serve::CASE_PATH),
        ("TOKEN_PATH", callrecon::serve::TOKEN_PATH),
    ];
    let mut routes = BTreeSet::new();
    for file in ["src/serve/mod.rs", "src/serve/review/mod.rs"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for (at, _) in text.match_indices(".route(") {
            let rest = &text[at + ".route(".len()..];
            // The call's text, to its closing parenthesis.
            let mut depth = 1;
            let end = rest
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .unwrap()
                .0;
            let call = &rest[..end];
            let (path, router) = call.split_once(',').unwrap();
            let path = path.trim();
            let path = match path.strip_prefix('"') {
                Some(p) => p.trim_end_matches('"').to_owned(),
                None => constants
                    .iter()
                    .find(|(name, _)| *name == path)
                    .unwrap_or_else(|| panic!("{file}: {path}"))
                    .1
                    .to_owned(),
            };
            // The method routers at the call's own level: `get(`, `.post(` …, not inside closures.
            let mut depth = 0;
            for (i, c) in router.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    for method in ["get", "post", "put", "patch", "delete"] {
                        let starts = router[i..].starts_with(&format!("{method}("));
                        let word = i == 0 || !router[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_');
                        if starts && word {
                            routes.insert((method.to_owned(), path.clone()));
                        }
                    }
                }
            }
        }
    }
    assert!(routes.len() >= 12, "{routes:?}");
    routes
}

/// Issue 43 finding 8: the test compared the served document with the same file compiled in,
/// which could not fail. Now: every route is documented, and every documented operation
/// answers (with a status it documents) rather than 404/405.
#[sqlx::test(migrator = "MIGRATOR")]
async fn every_route_is_documented_and_every_documented_operation_answers(pool: PgPool) {
    let doc: Value = serde_json::from_str(callrecon::serve::OPENAPI).unwrap();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| item.as_object().unwrap().keys().map(move |m| (m.clone(), path.clone())))
        .collect();
    let served = served_routes();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    assert!(undocumented.is_empty(), "routes missing from docs/openapi.json: {undocumented:?}");
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(unserved.is_empty(), "documented but not routed: {unserved:?}");

    let (base, stop, task) = start_server(&pool).await;
    let http = reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    for (method, path) in &documented {
        let url = format!("{base}{}", path.replace("{id}", "1"));
        let resp = http.request(method.to_uppercase().parse().unwrap(), &url).send().await.unwrap();
        let status = resp.status().as_u16().to_string();
        let responses = &doc["paths"][path][method]["responses"];
        assert!(responses.get(&status).is_some(), "{method} {path}: {status} is not documented");
        // An operation documented as a 404 alone (the SDK's case endpoint) is one that says so.
        let only_404 = responses.as_object().unwrap().keys().all(|k| k == "404");
        assert!(
            !["404", "405"].contains(&status.as_str()) || path.contains("{id}") || only_404,
            "{method} {path}: {status}"
        );
    }
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// schemathesis (PyPI; `scripts/schemathesis.sh` installs it) against a live server with a
/// token, an API user's credentials and an analyst's session: for about 40 seconds it sends the
/// document's examples, its coverage cases (boundaries, missing and wrong-typed values) and
/// generated requests to every operation, and checks each answer: no 5xx, a status, content
/// type, headers and body the document describes. A document it cannot read fails it too.
#[sqlx::test(migrator = "MIGRATOR")]
async fn schemathesis_finds_no_answer_outside_the_document(pool: PgPool) {
    let root = env!("CARGO_MANIFEST_DIR");
    let install = std::process::Command::new("bash").arg(format!("{root}/scripts/schemathesis.sh")).output().unwrap();
    assert!(install.status.success(), "{}", String::from_utf8_lossy(&install.stderr));
    let schemathesis = String::from_utf8(install.stdout).unwrap().trim().to_owned();

    let (base, stop, task) = start_server(&pool).await;
    let http = client();
    let roles = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let poster = callrecon::users::add(&pool, "acme-crm", &roles(&["AsyncMetaData"])).await.unwrap();
    let analyst = callrecon::users::add(&pool, "ana", &roles(&["Analyst"])).await.unwrap();
    let token = api_token(&http, &base, &poster.client_id, &poster.client_secret).await;
    let session = desk_session(&base, "ana", &analyst.client_secret).await;
    let session = session.trim_start_matches("callrecon_review=");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            "[auth.openapi.bearer]\nbearer = \"{}\"\n\n[auth.openapi.clientBasic]\nusername = \"{}\"\npassword = \"{}\"\n\n\
             [auth.openapi.session]\napi_key = \"{}\"\n",
            token,
            poster.client_id,
            poster.client_secret,
            session
        ),
    )
    .unwrap();
    // The venv's CPython 3.11 sometimes fails to parse a large source file while hypothesis
    // describes a lambda ("AST constructor recursion depth mismatch"): an error of the tool's
    // interpreter, not a finding. A run whose only problems are that error is run again, twice at
    // most; any finding, or any other error, fails at once.
    let mut attempts = 0;
    let (out, text) = loop {
        attempts += 1;
        let run = tokio::process::Command::new(&schemathesis)
            .current_dir(dir.path())
            .args(["--config-file", config.to_str().unwrap(), "--no-color", "run", &format!("{base}/openapi.json")])
            .args(["--url", &base, "--checks"])
            .arg("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance")
            .args(["--phases", "examples,coverage,fuzzing", "--max-time", "40", "--workers", "2", "--seed", "43"])
            .args(["--request-timeout", "20", "--max-redirects", "0", "--suppress-health-check", "all"])
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(120), run).await.expect("schemathesis ends").unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        eprintln!("{text}");
        if out.status.success() || attempts == 3 || !only_the_interpreters_ast_error(&text) {
            break (out, text);
        }
        eprintln!("schemathesis stopped on its interpreter's AST error alone: running it again");
    };
    assert!(out.status.success(), "schemathesis:\n{text}");
    let generated: u64 = text
        .split(" generated,")
        .next()
        .and_then(|s| s.rsplit(char::is_whitespace).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(generated >= 100, "schemathesis generated {generated} test cases:\n{text}");
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// Whether schemathesis' only problems are errors of its interpreter's AST parser (the venv's
/// CPython 3.11): no check failed, and every operation in its ERRORS section failed that way.
fn only_the_interpreters_ast_error(text: &str) -> bool {
    if text.contains("FAILURES") {
        return false;
    }
    let Some(errors) = text.split("= ERRORS =").nth(1) else { return false };
    let operations: Vec<&str> = errors.split("\n___").skip(1).collect();
    !operations.is_empty() && operations.iter().all(|o| o.contains("AST constructor recursion depth mismatch"))
}

#[test]
fn only_the_ast_error_is_run_again() {
    let ast = "=== ERRORS ===\n___ GET /x ___\nRuntime Error\n\nAST constructor recursion depth mismatch (before=66, after=93)\n\
               ___ POST /x ___\nRuntime Error\n\nAST constructor recursion depth mismatch (before=66, after=123)\n";
    assert!(only_the_interpreters_ast_error(ast));
    assert!(!only_the_interpreters_ast_error(&format!("{ast}=== FAILURES ===\n___ GET /y ___\nServer error\n")));
    assert!(!only_the_interpreters_ast_error(&format!("{ast}___ GET /z ___\nRuntime Error\n\nConnection refused\n")));
    assert!(!only_the_interpreters_ast_error("=== FAILURES ===\nUndocumented HTTP status code\n"));
}
