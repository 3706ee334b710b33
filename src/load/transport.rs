//! How the load's requests reach the stack. Start at [`LoadClient`].
//!
//! A plain `http://` endpoint, with no proxy in the environment, gets
//! hyper's own HTTP/1.1 connections and a pool of idle ones, and nothing
//! more: reqwest's layers (its URL and redirect handling, its pool's
//! hand-offs) took a tenth to a fifth of the client's CPU per streamed
//! request, which a load generator that must never be the bottleneck
//! should not spend (`make bench` measures it beside oha). Everything else
//! (`https://`, a proxy) goes through reqwest. Both answer alike: a status
//! and the body's chunks as they arrive; neither follows a redirect nor
//! sends again a request the stack may have seen.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// The load's HTTP client, for one endpoint: build one per load with
/// [`LoadClient::new`].
#[derive(Clone)]
pub struct LoadClient {
    target: Arc<Target>,
    reqwest: reqwest::Client,
    /// Connections to the endpoint, when it is plain HTTP.
    http1: Option<Arc<Http1Pool>>,
}

/// Where requests go and what they all carry, worked out once per load.
#[derive(Debug)]
struct Target {
    url: reqwest::Url,
    /// Origin-form (`/v1/chat/completions`), as HTTP/1.1 sends it.
    path: hyper::Uri,
    /// `content-type`, the template's own headers, and `host`.
    headers: HeaderMap,
}

impl Target {
    /// `url` with the template's extra `headers`.
    fn new(url: &str, headers: &[(String, String)]) -> anyhow::Result<Self> {
        use anyhow::Context;
        let url = reqwest::Url::parse(url)
            .with_context(|| format!("the load's URL {url:?} is not a URL"))?;
        let path: hyper::Uri = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_string(),
        }
        .parse()
        .with_context(|| format!("the load's URL {url} has no usable path"))?;
        let mut map = HeaderMap::new();
        map.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .with_context(|| format!("the request header name {name:?} is not valid"))?;
            let value = HeaderValue::from_str(value)
                .with_context(|| format!("the value of request header {name} is not valid"))?;
            map.append(name, value);
        }
        if let Some(host) = url.host_str() {
            let host = match url.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_string(),
            };
            if let Ok(value) = HeaderValue::from_str(&host) {
                map.insert(reqwest::header::HOST, value);
            }
        }
        Ok(Self {
            url,
            path,
            headers: map,
        })
    }
}

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made.
    Connect(String),
    /// reqwest's own deadline passed (the load sets none of its own).
    Timeout(String),
    /// The connection failed while the request was sent or answered.
    Other(String),
}

impl LoadClient {
    /// A client for requests to `url` with the extra `headers`, holding up
    /// to `max_in_flight` idle connections; Nagle is off, for small SSE
    /// frames. Fails on a URL or header that could never be sent.
    pub fn new(
        url: &str,
        headers: &[(String, String)],
        max_in_flight: usize,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let target = Target::new(url, headers)?;
        let reqwest = crate::http::client_builder()
            .pool_max_idle_per_host(max_in_flight)
            .tcp_nodelay(true)
            // A redirect is the stack's answer, as it is for an OpenAI
            // client; following it would send the request a second time.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("cannot build the load's HTTP client")?;
        let http1 = Http1Pool::for_url(&target.url, max_in_flight).map(Arc::new);
        Ok(Self {
            target: Arc::new(target),
            reqwest,
            http1,
        })
    }

    /// The same client with reqwest alone, as for `https://`: for tests
    /// of that path against a plain local server.
    #[cfg(test)]
    fn through_reqwest(mut self) -> Self {
        self.http1 = None;
        self
    }

    /// True when requests go over the load's own HTTP/1.1 connections.
    pub fn is_plain_http1(&self) -> bool {
        self.http1.is_some()
    }

    /// POSTs `body`, with `extra` as one more header (a session's user);
    /// returns once the response's head has come.
    pub async fn post(
        &self,
        extra: Option<(&HeaderName, HeaderValue)>,
        body: Vec<u8>,
    ) -> Result<Response, SendError> {
        let target = &*self.target;
        let mut headers = target.headers.clone();
        if let Some((name, value)) = extra {
            headers.insert(name.clone(), value);
        }
        match &self.http1 {
            Some(pool) => {
                let mut request = hyper::Request::new(Full::new(Bytes::from(body)));
                *request.method_mut() = hyper::Method::POST;
                *request.uri_mut() = target.path.clone();
                *request.headers_mut() = headers;
                let (response, connection) = pool.send(request).await?;
                let (head, body) = response.into_parts();
                Ok(Response {
                    status: head.status,
                    body: Body::Http1 {
                        body,
                        connection: Some((connection, pool.clone())),
                    },
                })
            }
            _ => {
                let response = self
                    .reqwest
                    .post(target.url.clone())
                    .headers(headers)
                    .body(body)
                    .send()
                    .await
                    .map_err(|err| {
                        let text = crate::http::error_chain(&err);
                        if err.is_connect() {
                            SendError::Connect(text)
                        } else if err.is_timeout() {
                            SendError::Timeout(text)
                        } else {
                            SendError::Other(text)
                        }
                    })?;
                Ok(Response {
                    status: response.status(),
                    body: Body::Reqwest(response),
                })
            }
        }
    }
}

/// A response whose head has come; its body is read with [`Response::chunk`].
pub struct Response {
    pub status: reqwest::StatusCode,
    body: Body,
}

enum Body {
    Reqwest(reqwest::Response),
    Http1 {
        body: hyper::body::Incoming,
        /// Given back to the pool when the response is done with.
        connection: Option<(SendRequest<Full<Bytes>>, Arc<Http1Pool>)>,
    },
}

impl Drop for Response {
    /// Gives the connection back, even when the body was left before its
    /// very end (the reader stops at `[DONE]`): hyper has usually read the
    /// end with it, and the connection is then ready for the next request;
    /// if not, hyper closes it and the pool drops it when it sees so.
    fn drop(&mut self) {
        if let Body::Http1 { connection, .. } = &mut self.body
            && let Some((sender, pool)) = connection.take()
        {
            pool.check_in(sender);
        }
    }
}

impl Response {
    /// The body's next piece as it arrived, `None` at its end, or the text
    /// of what cut it.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, String>> {
        match &mut self.body {
            Body::Reqwest(response) => response
                .chunk()
                .await
                .map_err(|err| crate::http::error_chain(&err))
                .transpose(),
            Body::Http1 { body, connection } => loop {
                match body.frame().await {
                    None => {
                        if let Some((sender, pool)) = connection.take() {
                            pool.check_in(sender);
                        }
                        return None;
                    }
                    Some(Err(err)) => return Some(Err(crate::http::error_chain(&err))),
                    Some(Ok(frame)) => {
                        // Trailers carry nothing the load reads.
                        if let Ok(data) = frame.into_data() {
                            return Some(Ok(data));
                        }
                    }
                }
            },
        }
    }

    /// The whole body (for an error's text or a non-streamed answer).
    pub async fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let mut all = Vec::new();
        while let Some(chunk) = self.chunk().await {
            all.extend_from_slice(&chunk?);
        }
        Ok(all)
    }
}

/// Idle HTTP/1.1 connections to one `host:port`.
struct Http1Pool {
    /// `host:port`, as given to connect.
    address: String,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    max_idle: usize,
}

impl Http1Pool {
    /// A pool for `url` when hyper alone can serve it: plain HTTP, and no
    /// proxy in the environment (which reqwest would honour).
    fn for_url(url: &reqwest::Url, max_idle: usize) -> Option<Self> {
        const PROXY_VARIABLES: [&str; 4] = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"];
        if url.scheme() != "http"
            || PROXY_VARIABLES
                .iter()
                .any(|v| std::env::var_os(v).is_some())
        {
            return None;
        }
        let host = url.host_str()?;
        let port = url.port_or_known_default()?;
        Some(Self {
            // An IPv6 literal keeps its brackets: `[::1]:8000`.
            address: format!("{host}:{port}"),
            idle: Mutex::new(Vec::new()),
            max_idle: max_idle.max(1),
        })
    }

    /// Sends `request` on an idle connection, or a new one. A request that
    /// an idle connection could not take (the stack had closed it) was never
    /// written, so it goes on a new connection, as hyper's pooled client
    /// does; one written and then cut is the stack's failure, not retried.
    async fn send(
        &self,
        mut request: hyper::Request<Full<Bytes>>,
    ) -> Result<
        (
            hyper::Response<hyper::body::Incoming>,
            SendRequest<Full<Bytes>>,
        ),
        SendError,
    > {
        loop {
            let (mut sender, was_idle) = match self.check_out() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, sender)),
                Err(mut err) => match err.take_message() {
                    Some(unsent) if was_idle => request = unsent,
                    _ => return Err(SendError::Other(crate::http::error_chain(err.error()))),
                },
            }
        }
    }

    /// An idle connection ready for a request; closed ones are dropped, and
    /// one still finishing its last response stays for later.
    fn check_out(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut finishing = Vec::new();
        let mut found = None;
        while let Some(sender) = idle.pop() {
            if sender.is_ready() {
                found = Some(sender);
                break;
            }
            if !sender.is_closed() {
                finishing.push(sender);
            }
        }
        idle.extend(finishing);
        found
    }

    fn check_in(&self, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < self.max_idle {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, SendError> {
        let cannot = |err: &(dyn std::error::Error + 'static)| {
            SendError::Connect(format!(
                "cannot connect to {}: {}",
                self.address,
                crate::http::error_chain(err)
            ))
        };
        let stream = tokio::net::TcpStream::connect(&self.address)
            .await
            .map_err(|err| cannot(&err))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|err| cannot(&err))?;
        // The connection's own task: it ends when the stack closes it, or
        // when the sender and the last body are dropped.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_sends_origin_form_with_host_and_the_template_s_headers() {
        let target = Target::new(
            "http://127.0.0.1:8000/v1/completions?x=1",
            &[("x-team".into(), "a".into())],
        )
        .unwrap();
        assert_eq!(target.path, "/v1/completions?x=1");
        assert_eq!(target.headers["host"], "127.0.0.1:8000");
        assert_eq!(target.headers["x-team"], "a");
        assert_eq!(target.headers["content-type"], "application/json");
        let bad = Target::new("http://h/v1", &[("bad name".into(), "a".into())]);
        assert!(bad.unwrap_err().to_string().contains("bad name"));
    }

    #[test]
    fn only_plain_http_without_a_proxy_gets_its_own_connections() {
        let proxied = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        let plain = LoadClient::new("http://127.0.0.1:8000/v1", &[], 4).unwrap();
        assert_eq!(plain.is_plain_http1(), !proxied);
        let tls = LoadClient::new("https://127.0.0.1:8000/v1", &[], 4).unwrap();
        assert!(!tls.is_plain_http1());
        let Err(bad) = LoadClient::new("127.0.0.1:8000", &[], 4) else {
            panic!("a URL without a scheme was taken");
        };
        assert!(bad.to_string().contains("is not a URL"), "{bad}");
    }

    /// A server that streams a short SSE answer, or closes the connection
    /// after each answer when `close` is set; it counts the connections
    /// it accepted.
    async fn server(close: bool) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use axum::serve::ListenerExt;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/v1/chat/completions",
            listener.local_addr().unwrap()
        );
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let listener = listener.tap_io(move |_: &mut tokio::net::TcpStream| {
            counter.fetch_add(1, Ordering::Relaxed);
        });
        let answer = move || async move {
            let mut response = axum::response::Response::new(axum::body::Body::from(
                "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n",
            ));
            if close {
                response
                    .headers_mut()
                    .insert("connection", HeaderValue::from_static("close"));
            }
            response
        };
        let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(answer));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, accepted)
    }

    async fn read_all(client: &LoadClient) -> Result<String, String> {
        let mut response = client
            .post(None, b"{}".to_vec())
            .await
            .map_err(|e| format!("{e:?}"))?;
        assert_eq!(response.status, 200);
        let body = response.bytes().await?;
        Ok(String::from_utf8(body).unwrap())
    }

    #[tokio::test]
    async fn one_connection_carries_one_request_after_another() {
        let (url, accepted) = server(false).await;
        let client = LoadClient::new(&url, &[], 4).unwrap();
        if !client.is_plain_http1() {
            return; // a proxy in the environment: reqwest's pool, not ours
        }
        for _ in 0..20 {
            assert!(read_all(&client).await.unwrap().ends_with("[DONE]\n\n"));
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_connection_the_stack_closed_is_not_an_error_for_the_next_request() {
        let (url, accepted) = server(true).await;
        let client = LoadClient::new(&url, &[], 4).unwrap();
        for _ in 0..5 {
            read_all(&client).await.unwrap();
            // The stack's close reaches the idle connection before the next send.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), 5);
        // Back to back, a send may find the connection closing under it:
        // never written, it goes on a new one.
        for _ in 0..20 {
            read_all(&client).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error_on_both_paths() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = LoadClient::new(&format!("http://127.0.0.1:{port}/v1"), &[], 4).unwrap();
        for client in [client.clone(), client.through_reqwest()] {
            match client.post(None, Vec::new()).await {
                Err(SendError::Connect(text)) => assert!(text.contains("refused"), "{text}"),
                Err(other) => panic!("not a connect error: {other:?}"),
                Ok(response) => panic!("answered {}", response.status),
            }
        }
    }

    #[tokio::test]
    async fn reqwest_s_path_reads_the_same_answer_and_does_not_follow_a_redirect() {
        let (url, _) = server(false).await;
        let client = LoadClient::new(&url, &[], 4).unwrap().through_reqwest();
        assert!(!client.is_plain_http1());
        let mut response = client.post(None, b"{}".to_vec()).await.unwrap();
        let mut chunks = Vec::new();
        while let Some(chunk) = response.chunk().await {
            chunks.extend_from_slice(&chunk.unwrap());
        }
        assert!(
            String::from_utf8(chunks)
                .unwrap()
                .ends_with("data: [DONE]\n\n")
        );

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let moved = format!("http://{}/v1", listener.local_addr().unwrap());
        let app = axum::Router::new().route(
            "/v1",
            axum::routing::post(|| async { axum::response::Redirect::temporary("/elsewhere") }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        for client in [
            LoadClient::new(&moved, &[], 4).unwrap(),
            LoadClient::new(&moved, &[], 4).unwrap().through_reqwest(),
        ] {
            let response = client.post(None, b"{}".to_vec()).await.unwrap();
            assert_eq!(response.status, 307);
        }
    }
}
