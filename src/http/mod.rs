//! The HTTP surface (SPEC §4): the receive endpoints, health and readiness, metrics,
//! the admin tree, and the one error type the receive handlers answer with.

pub mod admin;
mod auth;
mod linger;
mod receive;
pub mod server;
pub mod tls;

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{StatusCode, header};
use serde::Serialize;

use crate::relay::Relay;

/// Seconds a sender is asked to wait before retrying a 503.
const RETRY_AFTER_SECS: u64 = 5;

/// The full router of a receiving process: receive endpoints plus operations endpoints.
pub fn receiver_router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route("/webhook/receive", post(receive::receive_default))
        .route("/webhooks/{name}", post(receive::receive_named))
        .merge(ops_routes(&relay))
        .with_state(relay)
}

/// A worker-only process's router: health, readiness, metrics and admin; no intake.
pub fn worker_router(relay: Arc<Relay>) -> Router {
    ops_routes(&relay).with_state(relay)
}

/// The admin listener's router (`ADMIN_LISTEN_ADDR`): metrics and admin, plus health
/// and readiness so an internal probe needs only this port.
pub fn admin_router(relay: Arc<Relay>) -> Router {
    admin_routes(&relay).with_state(relay)
}

/// Health, readiness, and, unless they have a listener of their own, metrics and admin.
fn ops_routes(relay: &Relay) -> Router<Arc<Relay>> {
    if relay.config.admin_listen_addr.is_some() {
        health_routes()
    } else {
        admin_routes(relay)
    }
}

fn health_routes() -> Router<Arc<Relay>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

fn admin_routes(relay: &Relay) -> Router<Arc<Relay>> {
    let routes = health_routes().route("/metrics", get(metrics));
    // Without a token the admin tree does not exist at all (404, not 401).
    match &relay.config.admin_token {
        Some(token) => routes.merge(admin::routes(token)),
        None => routes,
    }
}

/// A successful answer: what happened to the event, and its id.
#[derive(Debug, Serialize)]
pub struct Answer {
    /// `delivered`, `queued_for_retry`, `queued` or `dead_lettered` (SPEC §4.2).
    pub status: &'static str,
    /// The event id.
    pub id: String,
}

/// An error answer (SPEC §4.2): status code, a message, the event id, and for 503
/// a `Retry-After` telling the sender to keep the event and come back.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for the sender; never names which credential failed.
    pub message: String,
    /// The event id (or the id minted for this request when none could be read).
    pub id: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>, id: String) -> Self {
        Self {
            status,
            message: message.into(),
            id,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    status: &'static str,
    error: &'a str,
    id: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            status: "error",
            error: &self.message,
            id: &self.id,
        });
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            (
                self.status,
                [(header::RETRY_AFTER, RETRY_AFTER_SECS.to_string())],
                body,
            )
                .into_response()
        } else {
            (self.status, body).into_response()
        }
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn metrics() -> Response {
    const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";
    let body = crate::metrics::render();
    ([(header::CONTENT_TYPE, EXPOSITION)], body).into_response()
}

async fn readyz(State(relay): State<Arc<Relay>>) -> Response {
    match relay.broker.unready_reason() {
        None => Json(serde_json::json!({"status": "ready", "node": relay.broker.node()}))
            .into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, RETRY_AFTER_SECS.to_string())],
            Json(serde_json::json!({"status": "unavailable", "error": why, "node": relay.broker.node()})),
        )
            .into_response(),
    }
}
