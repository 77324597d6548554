//! `/admin/dlq` (SPEC §6): the DLQ operations over HTTP, behind `ADMIN_TOKEN` as a
//! bearer token compared in constant time. The routes exist only when the token is
//! configured; without it the whole `/admin` tree answers 404.

use std::ops::ControlFlow;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{StatusCode, header};
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::dlq::{Action, Dlq, DlqEntry, DlqError, Operation, Selection, StatusMatch};
use crate::relay::Relay;

/// Entries a list answers with when no `limit` is given.
const DEFAULT_LIMIT: u64 = 100;
/// Largest `limit` accepted: an answer is built in memory.
const MAX_LIMIT: u64 = 10_000;
/// Entries a dry run reports at most (its counts cover everything).
const MAX_REPORTED: usize = 1_000;

/// The admin routes, guarded by `token`.
pub fn routes(token: &Secret) -> Router<Arc<Relay>> {
    // Digests have one length whatever the token's, so the comparison leaks nothing.
    let expected: Arc<[u8]> = Sha256::digest(token.expose().as_bytes()).to_vec().into();
    Router::new()
        .route("/admin/dlq", get(list).delete(purge))
        .route("/admin/dlq/replay", post(replay))
        .route("/admin/dlq/{id}", get(show))
        .route_layer(middleware::from_fn_with_state(expected, require_token))
}

async fn require_token(State(expected): State<Arc<[u8]>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| Sha256::digest(token.trim().as_bytes()));
    let ok = presented.is_some_and(|p| bool::from(p.as_slice().ct_eq(&expected)));
    if !ok {
        tracing::warn!(path = %req.uri().path(), "admin request refused: missing or wrong bearer token");
        return AdminError::Unauthorized.into_response();
    }
    next.run(req).await
}

/// What an admin request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No bearer token, or the wrong one.
    #[error("authentication failed")]
    Unauthorized,
    /// The query string does not say something the relay can do.
    #[error("{0}")]
    BadRequest(String),
    /// No such message.
    #[error("{0}")]
    NotFound(String),
    /// The broker could not do it; try again.
    #[error(transparent)]
    Dlq(#[from] DlqError),
    /// The operation's task died (a bug); what it did is in the logs.
    #[error("the operation failed: {0}")]
    Internal(String),
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Dlq(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = Json(serde_json::json!({
            "status": "error",
            "error": crate::error_chain(&self),
        }));
        if status == StatusCode::UNAUTHORIZED {
            (status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
        } else {
            (status, body).into_response()
        }
    }
}

/// The query string of an admin request (`?all=true&id=a&id=b&status=5xx&...`).
#[derive(Debug, Default, PartialEq)]
pub struct AdminQuery {
    /// `limit`: entries in a list.
    pub limit: Option<u64>,
    /// `all=true`: a replay or purge of everything.
    pub all: bool,
    /// `id` (repeatable), `status`, `older_than`, `reason`.
    pub selection: Selection,
    /// `dry_run=true`: report only.
    pub dry_run: bool,
    /// `rate`: messages per second (replay).
    pub rate: Option<f64>,
}

/// Parses the query string; unknown keys are refused, so a typo never widens a purge (pure).
pub fn parse_query(query: &str) -> Result<AdminQuery, String> {
    let mut q = AdminQuery::default();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let value = value.trim();
        match key.as_ref() {
            "limit" => {
                q.limit = Some(
                    value
                        .parse()
                        .map_err(|_| format!("limit: expected a whole number, got {value:?}"))?,
                )
            }
            "all" => q.all = flag("all", value)?,
            "dry_run" => q.dry_run = flag("dry_run", value)?,
            "id" => {
                q.selection.ids.insert(value.to_owned());
            }
            "status" => {
                q.selection.status = Some(
                    value
                        .parse::<StatusMatch>()
                        .map_err(|e| format!("status: {e}"))?,
                )
            }
            "older_than" => {
                q.selection.older_than = Some(
                    humantime::parse_duration(value)
                        .map_err(|e| format!("older_than: {e} (use 10m, 2h, 7d)"))?,
                )
            }
            "reason" => q.selection.reason = Some(value.to_owned()),
            "rate" => {
                q.rate = Some(
                    value
                        .parse::<f64>()
                        .ok()
                        .filter(|r| r.is_finite() && *r > 0.0)
                        .ok_or_else(|| {
                            format!("rate: expected messages per second above 0, got {value:?}")
                        })?,
                )
            }
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    if q.all && !q.selection.is_everything() {
        return Err("all=true cannot be combined with filters".into());
    }
    Ok(q)
}

fn flag(name: &str, value: &str) -> Result<bool, String> {
    match value {
        "" | "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(format!("{name}: expected true or false, got {other:?}")),
    }
}

fn query(raw: Option<String>) -> Result<AdminQuery, AdminError> {
    parse_query(raw.as_deref().unwrap_or("")).map_err(AdminError::BadRequest)
}

/// Runs a DLQ job on its own task with a pooled connection: a client that hangs up
/// must not cut a walk short (which would hand messages back out of order).
async fn on_broker<T, F, Fut>(relay: &Relay, job: F) -> Result<T, AdminError>
where
    T: Send + 'static,
    F: FnOnce(Dlq, deadpool_lapin::Connection) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, DlqError>> + Send + 'static,
{
    let conn = relay
        .broker
        .pooled_connection()
        .await
        .map_err(|e| DlqError::Unreachable(e.to_string()))?;
    let dlq = Dlq::new(relay.topology(), relay.config.publish_timeout);
    match tokio::spawn(job(dlq, conn)).await {
        Ok(r) => r.map_err(AdminError::from),
        Err(e) => Err(AdminError::Internal(e.to_string())),
    }
}

#[derive(Serialize)]
struct Listing {
    queue: String,
    total: u64,
    messages: Vec<DlqEntry>,
}

/// `GET /admin/dlq?limit=N`: the head of the DLQ, oldest first, left unchanged.
async fn list(
    State(relay): State<Arc<Relay>>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Listing>, AdminError> {
    let q = query(raw)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(AdminError::BadRequest(format!(
            "limit: between 1 and {MAX_LIMIT}"
        )));
    }
    let listing = on_broker(&relay, move |dlq, conn| async move {
        let mut messages = Vec::new();
        let total = dlq
            .list(&conn, Some(limit), &CancellationToken::new(), |e| {
                messages.push(e);
                ControlFlow::Continue(())
            })
            .await?;
        Ok(Listing {
            queue: dlq.queue,
            total,
            messages,
        })
    })
    .await?;
    Ok(Json(listing))
}

/// `GET /admin/dlq/{id}`: one message with headers and body.
async fn show(
    State(relay): State<Arc<Relay>>,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    let wanted = id.clone();
    let found = on_broker(&relay, move |dlq, conn| async move {
        dlq.show(&conn, &wanted, &CancellationToken::new()).await
    })
    .await?;
    match found {
        Some(m) => Ok(Json(m).into_response()),
        None => Err(AdminError::NotFound(format!(
            "no message with id {id:?} in the DLQ"
        ))),
    }
}

/// `POST /admin/dlq/replay?...`: back to the work queue, attempt count reset.
async fn replay(
    State(relay): State<Arc<Relay>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, AdminError> {
    operate(&relay, Action::Replay, query(raw)?).await
}

/// `DELETE /admin/dlq?...`: delete for good.
async fn purge(
    State(relay): State<Arc<Relay>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, AdminError> {
    let q = query(raw)?;
    if q.rate.is_some() {
        return Err(AdminError::BadRequest(
            "rate applies to replays only".into(),
        ));
    }
    operate(&relay, Action::Purge, q).await
}

async fn operate(relay: &Relay, action: Action, q: AdminQuery) -> Result<Response, AdminError> {
    if !q.all && q.selection.is_everything() {
        return Err(AdminError::BadRequest(
            "say which messages: all=true, or id, status, older_than, reason".into(),
        ));
    }
    if q.limit.is_some() {
        return Err(AdminError::BadRequest(
            "limit applies to listing only".into(),
        ));
    }
    let op = Operation {
        action,
        selection: q.selection,
        dry_run: q.dry_run,
        rate: q.rate,
    };
    let (tally, reported, op) = on_broker(relay, move |dlq, conn| async move {
        let mut reported = Vec::new();
        let tally = dlq
            .run(
                &conn,
                &op,
                &CancellationToken::new(),
                |e| {
                    if op.dry_run && reported.len() < MAX_REPORTED {
                        reported.push(e.clone());
                    }
                },
                |_| {},
            )
            .await?;
        Ok((tally, reported, op))
    })
    .await?;
    let mut body: serde_json::Value =
        serde_json::from_str(&crate::dlq::cli::summary(&op, &tally, true))
            .expect("summaries are JSON");
    if op.dry_run {
        body["messages"] = serde_json::to_value(&reported).expect("entries serialise");
    }
    let status = if tally.failed > 0 || tally.stopped.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    Ok((status, Json(body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn queries_parse_and_typos_are_refused() {
        let q = parse_query("id=a&id=b&status=5xx&older_than=10m&dry_run=true&rate=20").unwrap();
        assert_eq!(q.selection.ids.len(), 2);
        assert_eq!(q.selection.status, Some(StatusMatch::Class(5)));
        assert_eq!(q.selection.older_than, Some(Duration::from_secs(600)));
        assert!(q.dry_run && !q.all);
        assert_eq!(q.rate, Some(20.0));
        assert_eq!(parse_query("").unwrap(), AdminQuery::default());
        assert!(parse_query("all").unwrap().all);
        assert!(
            parse_query("idd=a").is_err(),
            "a typo must not widen a purge"
        );
        assert!(parse_query("all=true&id=a").is_err());
        assert!(parse_query("limit=x").is_err());
        assert!(parse_query("rate=0").is_err());
        assert!(parse_query("older_than=soon").is_err());
        assert!(parse_query("dry_run=maybe").is_err());
        // Percent-encoding is decoded.
        let q = parse_query("id=a%2Fb").unwrap();
        assert!(q.selection.ids.contains("a/b"));
    }
}
