//! The least a forwarder can do per event, run beside the relay as a child process of
//! this binary (`relay-bench --serve-floor`): HTTP/1.1 in, then either one persistent,
//! mandatory, confirmed publish of the body to a queue (the raw publisher's message)
//! or one POST of it to the downstream on a pooled connection, then the relay's
//! answer. No checks, no envelope, no limits, no metrics, no logs. With
//! `FLOOR_ENVELOPE=true` its message carries the relay's envelope instead of the raw
//! publisher's bare properties (SPEC §2: the attempt count, first-received time,
//! webhook name and forwarded request headers), the least a forwarder must store.
//!
//! It is the reference for what the HTTP hop alone costs on this machine, where the
//! load generator, the broker and the forwarder share the cores: the relay's ratio
//! can reach the floor's and no further, so a target above the floor's ratio is out
//! of any relay's reach here (README, Performance).

use std::convert::Infallible;
use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::{self, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};

use webhook_relay::envelope::Envelope;
use webhook_relay::event;

use crate::amqp;

/// Where the floor sends each event.
enum Onward {
    /// Publishes to this queue (through the default exchange) and answers `queued`.
    Queue {
        /// Held open while the floor serves.
        _connection: Connection,
        channel: Channel,
        queue: String,
        /// Publishes the relay's envelope rather than bare properties.
        envelope: bool,
    },
    /// POSTs to this URL and answers `delivered`.
    Downstream {
        client: legacy::Client<HttpConnector, Full<Bytes>>,
        url: http::Uri,
    },
}

/// Serves until SIGTERM: `LISTEN_ADDR`, and `FLOOR_QUEUE` (with `AMQP_URL`, and
/// optionally `FLOOR_ENVELOPE=true`) or `DOWNSTREAM_URL`, from the environment. Exits
/// 0 on SIGTERM, as the relay does.
pub async fn serve(amqp_url: &str) -> anyhow::Result<()> {
    let var = |k: &str| std::env::var(k).with_context(|| format!("{k} is set"));
    let onward = match (
        std::env::var("FLOOR_QUEUE"),
        std::env::var("DOWNSTREAM_URL"),
    ) {
        (Ok(queue), _) => {
            let connection = amqp::connect(amqp_url).await?;
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions { nowait: false })
                .await?;
            Onward::Queue {
                _connection: connection,
                channel,
                queue,
                envelope: std::env::var("FLOOR_ENVELOPE").is_ok_and(|v| v == "true"),
            }
        }
        (_, Ok(url)) => {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            Onward::Downstream {
                client: legacy::Client::builder(TokioExecutor::new()).build(connector),
                url: url.parse().context("DOWNSTREAM_URL is a URI")?,
            }
        }
        _ => bail!("FLOOR_QUEUE or DOWNSTREAM_URL must be set"),
    };
    let onward = Arc::new(onward);
    let listener = tokio::net::TcpListener::bind(var("LISTEN_ADDR")?).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => accepted?.0,
            _ = term.recv() => return Ok(()),
        };
        stream.set_nodelay(true)?;
        let onward = onward.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let onward = onward.clone();
                async move { Ok::<_, Infallible>(answer(&onward, request).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Forwards one request and answers as the relay would; 502 when it could not.
async fn answer(onward: &Onward, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() == "/readyz" {
        return Response::new(Full::default());
    }
    let (parts, body) = request.into_parts();
    let Ok(body) = body.collect().await else {
        return status(StatusCode::BAD_REQUEST);
    };
    let body = body.to_bytes();
    let Some(id) = event_id(&body) else {
        return status(StatusCode::BAD_REQUEST);
    };
    let (code, word) = match onward {
        Onward::Queue {
            channel,
            queue,
            envelope,
            ..
        } => {
            let properties = if *envelope {
                // What the relay stores for a new event, made as the relay makes it;
                // the webhook name from the header only (the body is not parsed).
                Envelope::received(
                    id.clone(),
                    event::webhook_name(None, &parts.headers, None),
                    Some("application/json"),
                    event::forwarded_headers(&parts.headers, None, None),
                    Bytes::new(),
                )
                .properties()
            } else {
                amqp::raw_properties(&id)
            };
            match amqp::publish_stored(channel, "", queue, &body, properties).await {
                Ok(()) => (StatusCode::ACCEPTED, "queued"),
                Err(_) => return status(StatusCode::BAD_GATEWAY),
            }
        }
        Onward::Downstream { client, url } => {
            let mut forward = Request::new(Full::new(body));
            *forward.method_mut() = http::Method::POST;
            *forward.uri_mut() = url.clone();
            let headers = forward.headers_mut();
            headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
            if let Ok(v) = id.parse() {
                headers.insert("idempotency-key", v);
            }
            match client.request(forward).await {
                Ok(r) if r.status().is_success() => {
                    let _ = r.into_body().collect().await;
                    (StatusCode::OK, "delivered")
                }
                _ => return status(StatusCode::BAD_GATEWAY),
            }
        }
    };
    let json = format!(r#"{{"status":"{word}","id":"{id}"}}"#);
    let mut response = Response::new(Full::new(Bytes::from(json)));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    response
}

/// The event's id, found as the load generator writes it (`{"id":"<id>",...`), not
/// parsed: the least a forwarder can do to name an event.
fn event_id(body: &[u8]) -> Option<String> {
    let at = memchr::memmem::find(body, br#""id":""#)? + 6;
    let len = memchr::memchr(b'"', &body[at..])?;
    String::from_utf8(body[at..at + len].to_vec()).ok()
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::default());
    *response.status_mut() = code;
    response
}
