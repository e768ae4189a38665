//! The web dashboard the host serves at `/`: one page of plain
//! JavaScript (`app.js`) over the JSON API, its assets compiled into the
//! binary (no CDN: it works offline). The page and assets need no token;
//! the page asks for the host's token and sends it with every API call.

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("index.html");
const APP: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

pub(super) async fn index() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX).into_response()
}

pub(super) async fn asset(Path(name): Path<String>) -> Response {
    let (content_type, body) = match name.as_str() {
        "app.js" => ("text/javascript; charset=utf-8", APP),
        "style.css" => ("text/css; charset=utf-8", STYLE),
        _ => return (StatusCode::NOT_FOUND, "no such dashboard asset").into_response(),
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}
