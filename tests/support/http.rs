//! HTTP for tests: a keep-alive HTTP/1.1 client (hyper) for ordinary requests, and a raw-bytes
//! sender for requests a real client would refuse to send.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// An HTTP response as read off the wire.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One keep-alive HTTP/1.1 connection.
pub struct Client {
    sender: http1::SendRequest<Full<Bytes>>,
    host: String,
    /// The server said `Connection: close`, or the connection failed.
    pub closed: bool,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(Client {
            sender,
            host: addr.to_string(),
            closed: false,
        })
    }

    /// Sends one request and reads the whole answer.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(std::io::Error::other)?;
        let result = self.send(req).await;
        if result.is_err() {
            self.closed = true;
        }
        result
    }

    async fn send(&mut self, req: hyper::Request<Full<Bytes>>) -> std::io::Result<Response> {
        self.sender.ready().await.map_err(std::io::Error::other)?;
        let res = self
            .sender
            .send_request(req)
            .await
            .map_err(std::io::Error::other)?;
        let status = res.status().as_u16();
        let headers: Vec<(String, String)> = res
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes()
            .to_vec();
        let response = Response {
            status,
            headers,
            body,
        };
        if response
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            self.closed = true;
        }
        Ok(response)
    }

    /// `GET path` with an optional `Authorization` header.
    pub async fn get(
        &mut self,
        path: &str,
        authorization: Option<&str>,
    ) -> std::io::Result<Response> {
        match authorization {
            Some(a) => {
                self.request("GET", path, &[("Authorization", a)], b"")
                    .await
            }
            None => self.request("GET", path, &[], b"").await,
        }
    }
}

/// One request on a fresh connection (`Connection: close`); panics if there is no answer within
/// 10 s.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let once = async {
        let mut client = Client::connect(addr).await?;
        let mut all = vec![("Connection", "close")];
        all.extend_from_slice(headers);
        client.request(method, path, &all, body).await
    };
    tokio::time::timeout(Duration::from_secs(10), once)
        .await
        .expect("response within 10 s")
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// [`http`] without the panics: `GET path` on a fresh connection within `limit`.
pub async fn get_once(
    addr: SocketAddr,
    path: &str,
    authorization: Option<&str>,
    limit: Duration,
) -> std::io::Result<Response> {
    tokio::time::timeout(limit, async {
        let mut client = Client::connect(addr).await?;
        client.get(path, authorization).await
    })
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Sends `request` bytes as they are and parses the answer: for requests that are malformed on
/// purpose.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .expect("response within 10 s")
        .expect("read");
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> Response {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("complete response head");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = buf[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(pos) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..pos]).unwrap().trim(), 16)
                .unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[pos + 2..pos + 2 + size]);
            rest = &rest[pos + 2 + size + 2..];
        }
        body = out;
    }
    Response {
        status,
        headers,
        body,
    }
}

/// Sends `method path` with each token at once (one connection each) and returns the statuses,
/// in the order of `tokens`.
pub async fn with_each_token(
    addr: SocketAddr,
    method: &str,
    path: &str,
    tokens: &[String],
) -> Vec<u16> {
    let requests: Vec<_> = tokens
        .iter()
        .map(|t| {
            let (method, path, auth) = (method.to_owned(), path.to_owned(), format!("Token {t}"));
            async move {
                http(addr, &method, &path, &[("Authorization", &auth)], b"")
                    .await
                    .status
            }
        })
        .collect();
    super::join_all(requests).await
}
