//! [`HttpClient`]: a minimal HTTP/1.1 keep-alive client, enough for the gateway's tests and
//! `skein bench --http` (no TLS, no redirects, no proxies). Every read is bounded.

use std::io;
use std::net::SocketAddr;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Largest status line + headers read.
const MAX_HEAD: usize = 64 * 1024;
/// Largest response body read.
const MAX_BODY: usize = 1 << 30;

/// A response: status, headers (names lower-cased) and the body as received (not decompressed).
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// One keep-alive connection to `addr`, reopened when the server closes it.
#[derive(Debug)]
pub struct HttpClient {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    authorization: Option<String>,
}

impl HttpClient {
    /// A client for the server at `addr`; connects on first use.
    pub fn new(addr: SocketAddr) -> Self {
        HttpClient {
            addr,
            conn: None,
            authorization: None,
        }
    }

    /// Send `Authorization: Bearer <key>` with every request.
    pub fn with_bearer(mut self, key: &str) -> Self {
        self.authorization = Some(format!("Bearer {key}"));
        self
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> io::Result<HttpResponse> {
        self.request("GET", path, &[], &[]).await
    }

    /// `POST path` with `body` and extra `headers`.
    pub async fn post(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<HttpResponse> {
        self.request("POST", path, headers, body).await
    }

    /// Send one request and read its response. A request on a reused connection that the
    /// server had closed is sent once more on a new connection.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<HttpResponse> {
        let reused = self.conn.is_some();
        match self.try_request(method, path, headers, body).await {
            Ok(r) => Ok(r),
            Err(e) if reused && is_closed(&e) => {
                self.conn = None;
                self.try_request(method, path, headers, body).await
            }
            Err(e) => Err(e),
        }
    }

    async fn try_request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<HttpResponse> {
        if self.conn.is_none() {
            let s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().ok_or_else(|| invalid("no connection"))?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        let mut has_len = false;
        if let Some(a) = &self.authorization {
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            {
                head.push_str(&format!("Authorization: {a}\r\n"));
            }
        }
        for (k, v) in headers {
            has_len |= k.eq_ignore_ascii_case("content-length");
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !has_len && (method != "GET" || !body.is_empty()) {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let r = async {
            let sent = async {
                conn.get_mut().write_all(head.as_bytes()).await?;
                conn.get_mut().write_all(body).await
            }
            .await;
            match sent {
                Ok(()) => read_response(conn).await,
                // The server may have answered early (e.g. 413) and stopped reading: read that.
                Err(e) => read_response(conn).await.map_err(|_| e),
            }
        }
        .await;
        match r {
            Ok((resp, keep)) => {
                if !keep {
                    self.conn = None;
                }
                Ok(resp)
            }
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }
}

fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

async fn read_line(conn: &mut BufReader<TcpStream>, budget: &mut usize) -> io::Result<String> {
    let mut line = Vec::new();
    let n = (&mut *conn)
        .take(*budget as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if n > *budget {
        return Err(invalid("response head too large"));
    }
    *budget -= n;
    String::from_utf8(line)
        .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
        .map_err(|_| invalid("response head is not UTF-8"))
}

/// Read a response; the flag says whether the connection can be reused.
async fn read_response(conn: &mut BufReader<TcpStream>) -> io::Result<(HttpResponse, bool)> {
    let mut budget = MAX_HEAD;
    let status_line = read_line(conn, &mut budget).await?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line `{status_line}`")))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(conn, &mut budget).await?;
        if line.is_empty() {
            break;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header `{line}`")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut keep = !get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let body = if let Some(len) = get("content-length") {
        let len: usize = len.parse().map_err(|_| invalid("bad content-length"))?;
        if len > MAX_BODY {
            return Err(invalid("response body too large"));
        }
        let mut b = vec![0u8; len];
        conn.read_exact(&mut b).await?;
        b
    } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut b = Vec::new();
        loop {
            let mut budget = MAX_HEAD;
            let size_line = read_line(conn, &mut budget).await?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| invalid("bad chunk size"))?;
            if b.len() + size > MAX_BODY {
                return Err(invalid("response body too large"));
            }
            let start = b.len();
            b.resize(start + size, 0);
            conn.read_exact(&mut b[start..]).await?;
            let _ = read_line(conn, &mut budget).await?;
            if size == 0 {
                break;
            }
        }
        b
    } else {
        keep = false;
        let mut b = Vec::new();
        (&mut *conn)
            .take(MAX_BODY as u64)
            .read_to_end(&mut b)
            .await?;
        b
    };
    Ok((
        HttpResponse {
            status,
            headers,
            body,
        },
        keep,
    ))
}
