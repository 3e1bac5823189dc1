//! A small HTTP/1.1 GET client: plain or TLS (rustls with ring, through the `tokio-rustls`
//! that the MQTT client already links), `Range` requests, `Content-Length` and chunked
//! bodies, up to five redirects, a timeout on every read.
//!
//! Why not reqwest, hyper or ureq: the agent's size budget (≤ 4 MB stripped with TLS). In
//! probes built like the agent, over bare tokio+rustls they added +622 KB (reqwest),
//! +291 KB (ureq) and +237 KB (hyper-util); see BENCHMARKS.md "Agent footprint". The agent
//! only ever needs GET.

use crate::error::{Error, Result};
use rumqttc::tokio_rustls::{client::TlsStream, TlsConnector};
use rustls::pki_types::{CertificateDer, ServerName};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::net::TcpStream;

/// Longest status line plus headers accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Redirects followed.
const MAX_REDIRECTS: usize = 5;
/// Where Linux distributions keep the system CA bundle.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

fn err(code: &'static str, detail: impl Into<String>) -> Error {
    Error::Download {
        code,
        detail: detail.into(),
    }
}

/// A parsed `http(s)://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `https`?
    pub tls: bool,
    /// Host name or address (no brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    /// Parse an absolute http(s) URL.
    pub fn parse(url: &str) -> Result<Url> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(err("bad_url", format!("{url:?} is not http(s)")));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err(err("bad_url", "credentials in URLs are not supported"));
        }
        let default = if tls { 443 } else { 80 };
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let (h, rest) = h
                .split_once(']')
                .ok_or_else(|| err("bad_url", format!("{url:?}: bad IPv6 host")))?;
            let port = match rest.strip_prefix(':') {
                Some(p) => p
                    .parse()
                    .map_err(|_| err("bad_url", format!("{url:?}: bad port")))?,
                None => default,
            };
            (h.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    p.parse()
                        .map_err(|_| err("bad_url", format!("{url:?}: bad port")))?,
                ),
                None => (authority.to_owned(), default),
            }
        };
        if host.is_empty() || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(err("bad_url", format!("{url:?} has no host or a bad path")));
        }
        Ok(Url {
            tls,
            host,
            port,
            path,
        })
    }

    /// Resolve a `Location` header against this URL.
    fn join(&self, location: &str) -> Result<Url> {
        if location.starts_with("http://") || location.starts_with("https://") {
            return Url::parse(location);
        }
        if location.starts_with('/') {
            return Ok(Url {
                path: location.to_owned(),
                ..self.clone()
            });
        }
        Err(err(
            "bad_redirect",
            format!("unsupported Location {location:?}"),
        ))
    }
}

/// The client: TLS settings plus timeouts.
#[derive(Clone)]
pub struct Client {
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

fn load_pem(path: &Path, roots: &mut rustls::RootCertStore) -> std::io::Result<usize> {
    use rustls::pki_types::pem::PemObject;
    let mut n = 0;
    let iter =
        CertificateDer::pem_file_iter(path).map_err(|e| std::io::Error::other(e.to_string()))?;
    for c in iter.flatten() {
        if roots.add(c).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

impl Client {
    /// A client trusting the system CA bundle (`SSL_CERT_FILE` or the usual paths) plus
    /// `extra_ca`.
    pub fn new(connect_timeout: Duration, extra_ca: Option<&Path>) -> Result<Client> {
        crate::transport::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        let env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
        for p in env
            .iter()
            .map(|p| p.as_path())
            .chain(SYSTEM_BUNDLES.iter().map(Path::new))
        {
            if load_pem(p, &mut roots).unwrap_or(0) > 0 {
                break;
            }
        }
        if let Some(ca) = extra_ca {
            let n = load_pem(ca, &mut roots).map_err(|e| Error::io("read CA", ca, e))?;
            if n == 0 {
                return Err(err(
                    "bad_ca",
                    format!("{} holds no certificate", ca.display()),
                ));
            }
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Client {
            tls: Arc::new(tls),
            connect_timeout,
        })
    }

    /// GET `url`, from byte `range_from` on if given. `timeout` bounds the connect, the
    /// response head and (later) every body read.
    pub async fn get(
        &self,
        url: &str,
        range_from: Option<u64>,
        timeout: Duration,
    ) -> Result<Response> {
        let mut u = Url::parse(url)?;
        for _ in 0..=MAX_REDIRECTS {
            let resp = self.get_once(&u, range_from, timeout).await?;
            if matches!(resp.status, 301 | 302 | 303 | 307 | 308) {
                let loc = resp
                    .header("location")
                    .ok_or_else(|| err("bad_redirect", "redirect without Location"))?
                    .to_owned();
                u = u.join(&loc)?;
                continue;
            }
            return Ok(resp);
        }
        Err(err(
            "too_many_redirects",
            format!("more than {MAX_REDIRECTS} redirects"),
        ))
    }

    async fn get_once(
        &self,
        u: &Url,
        range_from: Option<u64>,
        timeout: Duration,
    ) -> Result<Response> {
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((u.host.as_str(), u.port)),
        )
        .await
        .map_err(|_| {
            err(
                "connect_timeout",
                format!("{}:{} did not answer", u.host, u.port),
            )
        })?
        .map_err(|e| err("connect_failed", format!("{}:{}: {e}", u.host, u.port)))?;
        let _ = tcp.set_nodelay(true);
        let stream = if u.tls {
            let name = ServerName::try_from(u.host.clone())
                .map_err(|e| err("bad_url", format!("{}: {e}", u.host)))?;
            let tls = tokio::time::timeout(
                self.connect_timeout,
                TlsConnector::from(self.tls.clone()).connect(name, tcp),
            )
            .await
            .map_err(|_| {
                err(
                    "connect_timeout",
                    format!("TLS handshake with {} timed out", u.host),
                )
            })?
            .map_err(|e| err("tls_failed", format!("{}: {e}", u.host)))?;
            Conn::Tls(Box::new(tls))
        } else {
            Conn::Plain(tcp)
        };
        let mut io = BufReader::with_capacity(64 * 1024, stream);
        let host = if (u.tls && u.port == 443) || (!u.tls && u.port == 80) {
            u.host.clone()
        } else {
            format!("{}:{}", u.host, u.port)
        };
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ringcast-agent/{}\r\nAccept-Encoding: identity\r\nConnection: close\r\n",
            u.path,
            env!("CARGO_PKG_VERSION")
        );
        if let Some(from) = range_from {
            req.push_str(&format!("Range: bytes={from}-\r\n"));
        }
        req.push_str("\r\n");
        let head = async {
            io.get_mut().write_all(req.as_bytes()).await?;
            io.get_mut().flush().await?;
            read_head(&mut io).await
        };
        let (status, headers) = tokio::time::timeout(timeout, head)
            .await
            .map_err(|_| {
                err(
                    "stalled",
                    format!("no response head from {} within {timeout:?}", u.host),
                )
            })?
            .map_err(|e| err("http_error", format!("{}: {e}", u.host)))?;
        let mut resp = Response {
            status,
            headers,
            io,
            body: Body::Eof,
            timeout,
        };
        resp.body = if resp
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            Body::Chunked {
                left: 0,
                done: false,
            }
        } else if let Some(n) = resp.header("content-length") {
            Body::Length(
                n.trim()
                    .parse()
                    .map_err(|_| err("http_error", "bad Content-Length"))?,
            )
        } else {
            Body::Eof
        };
        Ok(resp)
    }
}

async fn read_head<R: AsyncBufReadExt + Unpin>(
    io: &mut R,
) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut total = 0;
    let mut line = String::new();
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let n = io.read_line(&mut line).await?;
    total += n;
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| bad("not an HTTP/1.x response"))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        let n = io.read_line(&mut line).await?;
        total += n;
        if n == 0 {
            return Err(bad("connection closed inside the response head"));
        }
        if total > MAX_HEAD {
            return Err(bad("response head too large"));
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            return Ok((status, headers));
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
}

enum Body {
    Length(u64),
    Chunked { left: u64, done: bool },
    Eof,
}

/// A response whose body is read chunk by chunk.
pub struct Response {
    /// Status code.
    pub status: u16,
    headers: Vec<(String, String)>,
    io: BufReader<Conn>,
    body: Body,
    timeout: Duration,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .finish()
    }
}

impl Response {
    /// A header's value (names are case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The next piece of the body (`None` at the end). Each read waits at most the timeout:
    /// a stalled server fails with `stalled`.
    pub async fn chunk(&mut self) -> Result<Option<Vec<u8>>> {
        let t = self.timeout;
        tokio::time::timeout(t, self.next_piece())
            .await
            .map_err(|_| err("stalled", format!("no byte for {t:?}")))?
            .map_err(|e| err("http_error", e.to_string()))
    }

    async fn next_piece(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; 64 * 1024];
        match &mut self.body {
            Body::Length(0) => Ok(None),
            Body::Length(left) => {
                let want = (*left).min(buf.len() as u64) as usize;
                let n = self.io.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed before Content-Length",
                    ));
                }
                *left -= n as u64;
                buf.truncate(n);
                Ok(Some(buf))
            }
            Body::Eof => {
                let n = self.io.read(&mut buf).await?;
                if n == 0 {
                    return Ok(None);
                }
                buf.truncate(n);
                Ok(Some(buf))
            }
            Body::Chunked { left, done } => {
                if *done {
                    return Ok(None);
                }
                if *left == 0 {
                    let mut line = String::new();
                    self.io.read_line(&mut line).await?;
                    let size = line.trim().split(';').next().unwrap_or("");
                    let size = u64::from_str_radix(size.trim(), 16).map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size")
                    })?;
                    if size == 0 {
                        *done = true;
                        return Ok(None);
                    }
                    *left = size;
                }
                let want = (*left).min(buf.len() as u64) as usize;
                let n = self.io.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed inside a chunk",
                    ));
                }
                *left -= n as u64;
                if *left == 0 {
                    let mut crlf = [0u8; 2];
                    self.io.read_exact(&mut crlf).await?;
                }
                buf.truncate(n);
                Ok(Some(buf))
            }
        }
    }
}

/// Plain TCP or TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let u = Url::parse("http://127.0.0.1:8080/artifacts/sha256/ab?x=1").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (false, "127.0.0.1", 8080, "/artifacts/sha256/ab?x=1")
        );
        let u = Url::parse("https://cdn.example").unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str()), (true, 443, "/"));
        let u = Url::parse("https://[::1]:8443/a").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8443));
        for bad in [
            "ftp://x/",
            "http://",
            "http://u:p@h/",
            "http://h:99999/",
            "http://h/a b",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
        let base = Url::parse("http://h:1/a").unwrap();
        assert_eq!(base.join("/b").unwrap().path, "/b");
        assert_eq!(base.join("https://o/c").unwrap().host, "o");
    }

    #[tokio::test]
    async fn chunked_body_is_decoded() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n")
                .await
                .unwrap();
        });
        let c = Client::new(Duration::from_secs(2), None).unwrap();
        let mut r = c
            .get(
                &format!("http://127.0.0.1:{port}/x"),
                None,
                Duration::from_secs(2),
            )
            .await
            .unwrap();
        let mut body = Vec::new();
        while let Some(p) = r.chunk().await.unwrap() {
            body.extend(p);
        }
        assert_eq!(body, b"hello world");
    }
}
