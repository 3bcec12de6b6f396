//! `/metrics` over HTTP: the response both a node's public port and a separate metrics
//! listener (`--metrics-listen`, nodes and workers) give.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::tasks::Tasks;

/// What a metrics endpoint serves: the current text exposition.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The OpenMetrics text response.
pub fn response(text: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// Serves only `/metrics` on `listener` until shutdown; each connection is a task of `tasks`.
pub fn spawn(render: RenderMetrics, listener: TcpListener, tasks: &Tasks) {
    let connections = tasks.clone();
    tasks.spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = connections.shutdown().cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((stream, _)) = accepted else { continue };
            let render = render.clone();
            let shutdown = connections.shutdown().clone();
            connections.spawn(async move {
                let service = service_fn(|req: Request<Incoming>| {
                    let render = render.clone();
                    async move {
                        Ok::<_, Infallible>(match req.uri().path() {
                            "/metrics" => response(render()),
                            _ => {
                                let mut missing = Response::new(Full::new(Bytes::from_static(
                                    b"only /metrics here\n",
                                )));
                                *missing.status_mut() = StatusCode::NOT_FOUND;
                                missing
                            }
                        })
                    }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                let mut conn = std::pin::pin!(conn);
                // A scraper's keep-alive connection must not hold shutdown up.
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
    });
}
