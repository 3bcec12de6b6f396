//! Operator endpoints (`/admin/*`) and who may call them: the token, or this machine's own
//! tools when there is none.

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::header;
use hyper::{Method, Request, Response, StatusCode};

use crate::edge::respond::{Body, json, json_error};
use crate::node::Node;

/// Operator endpoints. With `--admin-token`, only requests carrying it (as a header: a
/// browser cannot add one to a forged request). Without one, only this machine's own clients
/// — never through a balancer (every client there may look local) and never from a web page
/// (a request with an `Origin` header), so no site a local browser opens can reload plugins.
pub async fn serve(
    node: &Node,
    behind_proxy: bool,
    peer: SocketAddr,
    req: &Request<Incoming>,
    path: &str,
) -> Response<Body> {
    let method = req.method();
    match &node.config.admin_token {
        Some(token) => {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if given.is_none_or(|given| !constant_time_eq(given.as_bytes(), token.as_bytes())) {
                return json_error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "admin token required",
                );
            }
        }
        None if behind_proxy => {
            return json_error(
                StatusCode::FORBIDDEN,
                "unauthorized",
                "admin endpoints need --admin-token behind a balancer (--proxy-protocol)",
            );
        }
        None if !peer.ip().is_loopback() => {
            return json_error(
                StatusCode::FORBIDDEN,
                "unauthorized",
                "admin endpoints answer loopback clients only (no --admin-token set)",
            );
        }
        None if req.headers().contains_key(header::ORIGIN) => {
            return json_error(
                StatusCode::FORBIDDEN,
                "unauthorized",
                "admin requests from a web page need --admin-token",
            );
        }
        None => {}
    }
    match (method, path) {
        (&Method::GET, "/admin/plugins") => json(StatusCode::OK, node.plugins.status()),
        (&Method::POST, "/admin/plugins/reload") => {
            let report = node.plugins.reload().await;
            let status = if report.get("error").is_some() {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::OK
            };
            json(status, report)
        }
        (_, "/admin/plugins" | "/admin/plugins/reload") => json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "bad_request",
            "wrong method for this endpoint",
        ),
        _ => json_error(StatusCode::NOT_FOUND, "bad_request", "no such endpoint"),
    }
}

/// Compares secrets without leaking where they differ through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
