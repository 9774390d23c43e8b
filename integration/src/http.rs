//! A minimal HTTP/1.1 GET, enough for `/healthz`, `/readyz` and `/metrics` without pulling an
//! HTTP client into the workspace.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Status code and body of an HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// `GET url` (`http://host:port/path`, or `https://` trusting the test CA), with
/// `Connection: close` so the body ends at EOF.
pub async fn get(url: &str, timeout: Duration) -> Result<HttpResponse> {
    tokio::time::timeout(timeout, get_inner(url))
        .await
        .with_context(|| format!("GET {url}: no response within {timeout:?}"))?
        .with_context(|| format!("GET {url}"))
}

async fn get_inner(url: &str) -> Result<HttpResponse> {
    let (tls, rest) = match url.strip_prefix("https://") {
        Some(rest) => (true, rest),
        None => (
            false,
            url.strip_prefix("http://")
                .context("only http:// and https:// URLs are supported")?,
        ),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    let mut raw = Vec::new();
    if tls {
        let (host, port) = authority
            .rsplit_once(':')
            .context("https:// URL without a port")?;
        let mut stream = crate::tls::connect(host, port.parse()?).await?;
        stream.write_all(request.as_bytes()).await?;
        // A server that closes without close_notify still gave the whole response.
        if let Err(e) = stream.read_to_end(&mut raw).await
            && raw.is_empty()
        {
            return Err(e.into());
        }
    } else {
        let mut stream = TcpStream::connect(authority).await?;
        stream.write_all(request.as_bytes()).await?;
        stream.read_to_end(&mut raw).await?;
    }
    parse(&raw)
}

fn parse(raw: &[u8]) -> Result<HttpResponse> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or_default();
    let Some(status) = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
    else {
        bail!("bad status line {status_line:?}");
    };
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok(HttpResponse { status, body })
}

/// Joins the chunks of a chunked body (sizes in hex on their own lines).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16);
        let Ok(size) = size else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked() {
        let r = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
        let r = parse(b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n4\r\nnot \r\n6\r\nready\n\r\n0\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "not ready\n"));
    }
}
