//! The receive endpoints (SPEC §4.2, §4.3): read and check the request, then deliver
//! inline or queue it, and answer 2xx only once the event is delivered or durable.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::linger::{LINGER, Lingering};
use super::{Answer, ApiError, auth};
use crate::broker::{PublishError, Target};
use crate::envelope::Envelope;
use crate::event;
use crate::payload;
use crate::relay::{Relay, Settled};

type Answered = Result<(StatusCode, Json<Answer>), ApiError>;

// The handlers take the whole request rather than the `HeaderMap` and `Uri`
// extractors, which clone what the request already owns.

/// `POST /webhook/receive`: the prototype's path.
pub async fn receive_default(State(relay): State<Arc<Relay>>, request: Request) -> Answered {
    let (parts, body) = request.into_parts();
    let answered = receive(&relay, None, parts.headers, body).await;
    counted("/webhook/receive", answered)
}

/// `POST /webhooks/{name}`: the name becomes the webhook name.
pub async fn receive_named(State(relay): State<Arc<Relay>>, request: Request) -> Answered {
    let (parts, body) = request.into_parts();
    // Read from the raw path and decoded leniently: a name that does not decode to
    // UTF-8 (`%FF`) is still a name, never a reason to refuse the event.
    let segment = parts.uri.path().rsplit('/').next().unwrap_or_default();
    let name = percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned();
    let answered = receive(&relay, Some(name), parts.headers, body).await;
    counted("/webhooks/{name}", answered)
}

/// Counts the answer by endpoint (the route, not the path: bounded label values).
fn counted(endpoint: &'static str, answered: Answered) -> Answered {
    match &answered {
        Ok((code, Json(a))) => crate::metrics::received(endpoint, code.as_u16(), a.status),
        Err(e) => crate::metrics::received(endpoint, e.status.as_u16(), "error"),
    }
    answered
}

async fn receive(relay: &Relay, name: Option<String>, headers: HeaderMap, body: Body) -> Answered {
    // Until the body is parsed, the only id available is the sender's key (or a new one).
    let early_id = || event::event_id(&headers, None).unwrap_or_else(event::new_event_id);
    let cfg = &relay.config;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A request answered before its body is read to the end has the rest read and thrown
    // away after the answer (src/http/linger.rs): the sender reads the answer, not a reset.
    let body = Lingering::new(
        body,
        &headers,
        declared,
        cfg.max_body_bytes,
        LINGER.min(cfg.request_timeout),
    );

    if !auth::check_headers(&cfg.inbound, &headers) {
        return Err(unauthorized(early_id()));
    }
    // While the broker blocks publishers nothing could be stored: answer before the
    // body is read, so a burst of refused requests holds no memory.
    if let Some(session) = relay.broker.session()
        && session.is_blocked()
    {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker is blocking publishers (memory or disk alarm); retry later",
            early_id(),
        ));
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body exceeds {} bytes", cfg.max_body_bytes),
            early_id(),
        )
    };
    if declared.is_some_and(|n| n > cfg.max_body_bytes as u64) {
        return Err(too_large());
    }
    // The body's bytes are held in the intake budget until the event is settled
    // (SPEC §4.5). A declared length is held before anything is read: past the budget
    // the request waits unread (TCP holds the sender back) up to INTAKE_WAIT_MS.
    let mut budget = relay.intake.body();
    let full = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the relay is taking in as much as it can; retry later",
            early_id(),
        )
    };
    if let Some(n) = declared {
        budget.hold(n as usize).await.map_err(|_| full())?;
    }
    // Stops reading as soon as the limit is passed; never buffers more than the limit.
    // A sender trickling its body (slowloris) is cut off after REQUEST_TIMEOUT_MS. A
    // body without a length (chunked) is held as it grows.
    let reading = async {
        let mut body = Limited::new(body, cfg.max_body_bytes);
        // One buffer of the declared size: the frames are copied in as they arrive,
        // never collected and then joined (which would hold the body twice).
        let mut first: Option<Bytes> = None;
        let mut joined = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(BodyError::Read)?;
            if let Ok(data) = frame.into_data() {
                let len = first.as_ref().map_or(0, Bytes::len) + joined.len() + data.len();
                budget.hold(len).await.map_err(|_| BodyError::Full)?;
                match first.take() {
                    // A body in one frame is kept as it came, without a copy.
                    None if joined.is_empty() => first = Some(data),
                    None => joined.extend_from_slice(&data),
                    Some(head) => {
                        joined.reserve(declared.map_or(len, |n| n as usize));
                        joined.extend_from_slice(&head);
                        joined.extend_from_slice(&data);
                    }
                }
            }
        }
        Ok(first.unwrap_or_else(|| joined.freeze()))
    };
    let bytes = match tokio::time::timeout(cfg.request_timeout, reading).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(BodyError::Read(e))) if e.is::<LengthLimitError>() => return Err(too_large()),
        Ok(Err(BodyError::Full)) => return Err(full()),
        Ok(Err(BodyError::Read(_))) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "could not read the request body",
                early_id(),
            ));
        }
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "body not received within {} ms",
                    cfg.request_timeout.as_millis()
                ),
                early_id(),
            ));
        }
    };
    if !auth::check_body(&cfg.inbound, &headers, &bytes) {
        return Err(unauthorized(early_id()));
    }
    // Only the identity fields are kept: the body itself travels on untouched.
    let identity = payload::inspect(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string(), early_id()))?;

    let id = event::event_id(&headers, Some(&identity)).unwrap_or_else(event::new_event_id);
    let webhook = event::webhook_name(name.as_deref(), &headers, Some(&identity));
    // Past MAX_BACKLOG the sender keeps the event (EventBridge retries for 24 h) rather
    // than the queues growing without bound; the depth is the broker's, read once a second.
    // Checked once the id is known, so the answer names the event.
    if let Some(held) = relay.protect.backlog_full() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "backlog full ({held} events waiting, MAX_BACKLOG {}); retry later",
                cfg.protect.max_backlog.unwrap_or_default()
            ),
            id.clone(),
        ));
    }
    let event_webhook = webhook.clone();
    let event = Envelope::received(
        id.clone(),
        webhook,
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        event::forwarded_headers(
            &headers,
            cfg.inbound.token_header.as_ref(),
            cfg.forward_headers.as_deref(),
        ),
        bytes,
    );

    let unavailable = |e: PublishError| {
        // Broker trouble is logged once per episode by the broker, not once per request.
        // The event's span is made only here, not for every request: the log layer
        // formats a span's fields when it is created.
        crate::telemetry::event_span(&id, &event_webhook)
            .in_scope(|| tracing::debug!(error = %e, "answering 503: event not stored"));
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "event could not be stored; retry later",
            id.clone(),
        )
    };
    let answer = |status, word| {
        Ok((
            status,
            Json(Answer {
                status: word,
                id: id.clone(),
            }),
        ))
    };

    // Past INLINE_MAX_INFLIGHT, or when no inline attempt may be made now (the breaker
    // is open, the rate is used up), the event is not made to wait for the downstream:
    // it is published queue-first and a worker delivers it (a burst is absorbed).
    let inline_slot = if cfg.inline_delivery {
        relay.intake.try_inline()
    } else {
        None
    };
    let ticket = inline_slot
        .as_ref()
        .and_then(|_| relay.protect.admit_inline());
    let Some(ticket) = ticket else {
        // The body's budget is released once the publish is written, not confirmed.
        relay
            .broker
            .publish_owned(Target::Work, event, budget)
            .await
            .map_err(unavailable)?;
        return answer(StatusCode::ACCEPTED, "queued");
    };
    match relay
        .attempt_and_settle(event, Some(cfg.inline_timeout), ticket)
        .await
    {
        Ok(Settled::Delivered) => answer(StatusCode::OK, "delivered"),
        Ok(Settled::Retried { .. }) => answer(StatusCode::ACCEPTED, "queued_for_retry"),
        Ok(Settled::DeadLettered(_)) => answer(StatusCode::ACCEPTED, "dead_lettered"),
        Err(e) => Err(unavailable(e)),
    }
}

/// Why a request body could not be taken in.
enum BodyError {
    /// The body failed (too large, or the client broke off).
    Read(Box<dyn std::error::Error + Send + Sync>),
    /// No room in the intake budget in time.
    Full,
}

fn unauthorized(id: String) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "authentication failed", id)
}
