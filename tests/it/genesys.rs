//! OAuth back to Genesys Cloud (SPEC §9) against a local mock token endpoint: the
//! request is client credentials with HTTP Basic, the token is cached, 50 concurrent
//! callers make one request, a 429 is waited out, 400/401 come back as clear errors,
//! and `webhook-relay genesys token` prints expiry and scopes, never the token.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use webhook_relay::genesys::{GenesysSettings, TokenClient, TokenError};

const CLIENT_ID: &str = "7de3af06-c0b3-4f9b-af45-72f4a1403797";
const CLIENT_SECRET: &str = "gc-secret-Vf81xQ2";
const ACCESS_TOKEN: &str = "gc-access-token-9KcR3tN7vB1mZ5";

/// What the mock answers.
#[derive(Debug, Clone)]
enum Answer {
    Token {
        expires_in: u64,
        scope: Option<&'static str>,
    },
    Status(u16, &'static str),
    RateLimited(&'static str),
}

/// One request the mock saw.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

struct Shared {
    script: Mutex<VecDeque<Answer>>,
    default: Answer,
    latency: Duration,
    seen: Mutex<Vec<Seen>>,
}

/// A local token endpoint.
struct MockLogin {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl MockLogin {
    async fn start(default: Answer, script: Vec<Answer>, latency: Duration) -> Self {
        let shared = Arc::new(Shared {
            script: Mutex::new(script.into()),
            default,
            latency,
            seen: Mutex::new(Vec::new()),
        });
        let app = Router::new().fallback(answer).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, shared }
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    fn client(&self, secret: &str) -> TokenClient {
        let settings = GenesysSettings::from_vars(
            Some(CLIENT_ID.into()),
            Some(secret.into()),
            Some("mypurecloud.ie".into()),
            Some(self.url()),
        )
        .unwrap();
        TokenClient::genesys(settings.credentials().unwrap()).unwrap()
    }
}

async fn answer(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    s.seen.lock().unwrap().push(Seen {
        method,
        path: uri.path().to_owned(),
        headers,
        body,
        at: Instant::now(),
    });
    tokio::time::sleep(s.latency).await;
    let next = s
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| s.default.clone());
    match next {
        Answer::Token { expires_in, scope } => {
            let mut json = serde_json::json!({
                "access_token": ACCESS_TOKEN,
                "token_type": "bearer",
                "expires_in": expires_in,
            });
            if let Some(scope) = scope {
                json["scope"] = scope.into();
            }
            axum::Json(json).into_response()
        }
        Answer::Status(code, body) => (
            StatusCode::from_u16(code).unwrap(),
            [("content-type", "application/json")],
            body,
        )
            .into_response(),
        Answer::RateLimited(retry_after) => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", retry_after)],
            r#"{"message":"Rate limit exceeded the maximum. Retry the request in [1] seconds","code":"too.many.requests","status":429}"#,
        )
            .into_response(),
    }
}

const OK: Answer = Answer::Token {
    expires_in: 86399,
    scope: None,
};

#[tokio::test]
async fn the_token_request_is_client_credentials_with_basic_auth_and_is_cached() {
    let login = MockLogin::start(OK, vec![], Duration::ZERO).await;
    let client = login.client(CLIENT_SECRET);
    let token = client.token().await.unwrap();
    assert_eq!(token.issued.access_token.expose(), ACCESS_TOKEN);
    assert_eq!(token.issued.expires_in, Duration::from_secs(86399));
    assert_eq!(token.authorization(), format!("Bearer {ACCESS_TOKEN}"));
    assert!(
        !format!("{token:?}").contains(ACCESS_TOKEN),
        "Debug hides the token"
    );

    let seen = login.seen();
    assert_eq!(seen.len(), 1);
    let r = &seen[0];
    assert_eq!(r.method, Method::POST);
    assert_eq!(r.path, "/oauth/token");
    let expected = format!(
        "Basic {}",
        BASE64.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    );
    assert_eq!(r.headers["authorization"], expected.as_str());
    assert_eq!(
        r.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    assert_eq!(r.body.as_ref(), b"grant_type=client_credentials");

    for _ in 0..5 {
        assert_eq!(
            client.token().await.unwrap().issued.access_token.expose(),
            ACCESS_TOKEN
        );
    }
    assert_eq!(login.seen().len(), 1, "cached, not requested again");
}

#[tokio::test]
async fn fifty_concurrent_callers_make_one_request() {
    let login = MockLogin::start(OK, vec![], Duration::from_millis(300)).await;
    let client = Arc::new(login.client(CLIENT_SECRET));
    let callers: Vec<_> = (0..50)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.token().await })
        })
        .collect();
    for c in callers {
        assert_eq!(
            c.await.unwrap().unwrap().issued.access_token.expose(),
            ACCESS_TOKEN
        );
    }
    assert_eq!(login.seen().len(), 1);
}

#[tokio::test]
async fn a_429_is_waited_out_then_served() {
    let login = MockLogin::start(OK, vec![Answer::RateLimited("1")], Duration::ZERO).await;
    let client = login.client(CLIENT_SECRET);
    let token = client.token().await.unwrap();
    assert_eq!(token.issued.access_token.expose(), ACCESS_TOKEN);
    let seen = login.seen();
    assert_eq!(seen.len(), 2);
    let gap = seen[1].at - seen[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "asked again after only {gap:?}"
    );
}

#[tokio::test]
async fn refusals_are_clear_and_never_show_the_secret() {
    let login = MockLogin::start(
        OK,
        vec![
            Answer::Status(
                400,
                r#"{"error":"invalid_client","description":"client not found","error_description":"client not found"}"#,
            ),
            Answer::Status(401, r#"{"error":"invalid_client","description":"authentication failed"}"#),
        ],
        Duration::ZERO,
    )
    .await;
    let client = login.client("wrong-secret-value");
    let e = client.token().await.unwrap_err();
    assert_eq!(
        e,
        TokenError::Refused("invalid_client: client not found".into())
    );
    let text = e.to_string();
    assert!(
        text.contains("HTTP 400") && text.contains("Client Credentials grant"),
        "{text}"
    );
    let e = client.token().await.unwrap_err();
    assert!(
        matches!(e, TokenError::Unauthorized { status: 401, .. }),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.contains("HTTP 401") && text.contains("GENESYS_CLIENT_SECRET"),
        "{text}"
    );
    assert!(
        text.contains("authentication failed"),
        "the endpoint's words: {text}"
    );
    assert!(!text.contains("wrong-secret-value"));
    assert!(
        !e.is_transient(),
        "a configuration fault, not worth retrying"
    );
}

// ---- the command ----

fn run_cli(vars: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_webhook-relay"));
    cmd.args(["genesys", "token"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        // Unreachable: the command must not need the broker.
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().expect("binary runs")
}

async fn cli(vars: Vec<(&'static str, String)>) -> (i32, String, String) {
    let out = tokio::task::spawn_blocking(move || {
        let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_cli(&pairs)
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn vars(login: &MockLogin, secret: &str) -> Vec<(&'static str, String)> {
    vec![
        ("GENESYS_CLIENT_ID", CLIENT_ID.into()),
        ("GENESYS_CLIENT_SECRET", secret.into()),
        ("GENESYS_REGION", "eu-west-1".into()),
        ("GENESYS_LOGIN_URL", login.url()),
    ]
}

#[tokio::test]
async fn genesys_token_prints_expiry_and_scopes_never_the_token() {
    let login = MockLogin::start(
        Answer::Token {
            expires_in: 86399,
            scope: Some("analytics:readonly conversations"),
        },
        vec![],
        Duration::ZERO,
    )
    .await;
    let (code, stdout, stderr) = cli(vars(&login, CLIENT_SECRET)).await;
    assert_eq!(code, 0, "stdout {stdout}\nstderr {stderr}");
    println!("{stdout}");
    assert!(
        stdout.contains("expires in      86399 s (at 20"),
        "{stdout}"
    );
    assert!(
        stdout.contains("scopes          analytics:readonly conversations"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("client id       {CLIENT_ID}")),
        "{stdout}"
    );
    for shown in [&stdout, &stderr] {
        assert!(!shown.contains(ACCESS_TOKEN), "the token is never printed");
        assert!(
            !shown.contains(CLIENT_SECRET),
            "the secret is never printed"
        );
    }
    assert_eq!(login.seen().len(), 1);
}

#[tokio::test]
async fn genesys_token_with_a_wrong_secret_fails_clearly() {
    let login = MockLogin::start(
        Answer::Status(
            401,
            r#"{"error":"invalid_client","description":"authentication failed"}"#,
        ),
        vec![],
        Duration::ZERO,
    )
    .await;
    let (code, stdout, stderr) = cli(vars(&login, "not-the-secret")).await;
    assert_ne!(code, 0);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("not accepted (HTTP 401"), "{stderr}");
    assert!(stderr.contains("GENESYS_CLIENT_SECRET"), "{stderr}");
    assert!(!stderr.contains("not-the-secret"), "{stderr}");
}

#[test]
fn genesys_token_names_a_missing_or_bad_variable_before_connecting() {
    for (vars, var) in [
        (
            vec![
                ("GENESYS_CLIENT_SECRET", "s"),
                ("GENESYS_REGION", "eu-west-1"),
            ],
            "GENESYS_CLIENT_ID",
        ),
        (
            vec![("GENESYS_CLIENT_ID", "c"), ("GENESYS_REGION", "eu-west-1")],
            "GENESYS_CLIENT_SECRET",
        ),
        (
            vec![("GENESYS_CLIENT_ID", "c"), ("GENESYS_CLIENT_SECRET", "s")],
            "GENESYS_REGION",
        ),
        (
            vec![
                ("GENESYS_CLIENT_ID", "c"),
                ("GENESYS_CLIENT_SECRET", "s"),
                ("GENESYS_REGION", "mars"),
            ],
            "GENESYS_REGION",
        ),
    ] {
        let out = run_cli(&vars);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{vars:?}: {stderr}");
        assert!(stderr.contains(var), "{var} named in {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}
