//! The TCP proxy in front of every local process: a stable address, like a
//! pod's, whatever process is behind it now, and the place where network
//! faults act.
//!
//! It listens only while a process is up behind it, so a connection to a
//! dead replica is refused as a connection to a dead pod would be; and it
//! holds its port all along, so nothing else on the machine takes it. When the
//! process behind it dies, its connections end as that process's sockets
//! do: a reset is passed on as a reset, never as a clean end.
//!
//! [`Shaping`] delays chunks (delay ± jitter, order kept) and cuts
//! requests, on connections already open as well as new ones, like
//! `tc netem` on the pod's interface: by default on what the process sends,
//! with `both` also on what it receives. `loss` is the share of requests
//! whose connection is reset as they arrive: drawn once per request (the
//! first bytes the client sends after a response, or on a new
//! connection), from the fault's seed and the connection's number, so
//! `loss: 0.05` cuts about one request in twenty.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A network fault in force on a proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Shaping {
    pub delay: Duration,
    pub jitter: Duration,
    /// Chance that a request's connection is reset as the request arrives.
    pub loss: f64,
    /// Also delay what the process receives, not only what it sends.
    pub both_directions: bool,
    pub seed: u64,
}

impl Shaping {
    fn is_none(&self) -> bool {
        self.delay.is_zero() && self.jitter.is_zero() && self.loss <= 0.0
    }
}

pub struct FrontProxy {
    port: u16,
    target: watch::Sender<Option<u16>>,
    shaping: watch::Sender<Shaping>,
    task: JoinHandle<()>,
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot find a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// A port held without listening on it: a connection to it is refused, as
/// one to a dead pod is, yet no other socket on the machine can take it —
/// neither `bind(0)` nor an outgoing connection's ephemeral port. A port
/// merely found free and bound again later was once handed to an engine
/// while it was the router's front, and the load went straight to the
/// engine; a front left unbound through a restart could become the local
/// port of any pooled connection.
///
/// Whoever listens on it must also set `SO_REUSEPORT`, as the proxy's
/// listeners and shakedown's own servers started with `--reuse-port` do.
/// `SO_REUSEADDR` only on the listeners: between two sockets that both
/// set it and neither listens, Linux lets a stranger in.
pub(super) fn reserve_port() -> anyhow::Result<(TcpSocket, u16)> {
    let socket = TcpSocket::new_v4()
        .and_then(|socket| socket.set_reuseport(true).map(|()| socket))
        .context("cannot make a socket to hold a port")?;
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("cannot find a free port on 127.0.0.1")?;
    let port = socket.local_addr()?.port();
    Ok((socket, port))
}

/// A listener beside the socket that holds its port ([`reserve_port`]):
/// the proxy's own, and `--reuse-port` servers'. `SO_REUSEADDR` also lets
/// it past the TIME_WAIT leftovers of its predecessor's connections.
pub fn listen_on_held_port(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl FrontProxy {
    /// Reserves a front port; nothing listens on it until [`FrontProxy::up`].
    pub fn new() -> anyhow::Result<Self> {
        let (reserved, port) = reserve_port()?;
        let (target, rx) = watch::channel(None);
        let (shaping, shaping_rx) = watch::channel(Shaping::default());
        let task = tokio::spawn(serve(reserved, port, rx, shaping_rx));
        Ok(Self {
            port,
            target,
            shaping,
            task,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts accepting, forwarding to the process on `inner_port`.
    pub fn up(&self, inner_port: u16) {
        self.target.send_replace(Some(inner_port));
    }

    /// Stops accepting: new connections are refused.
    pub fn down(&self) {
        self.target.send_replace(None);
    }

    /// Puts a network fault in force, or lifts it with `Shaping::default()`.
    pub fn shape(&self, shaping: Shaping) {
        self.shaping.send_replace(shaping);
    }
}

impl Drop for FrontProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    reserved: TcpSocket,
    port: u16,
    mut target: watch::Receiver<Option<u16>>,
    shaping: watch::Receiver<Shaping>,
) {
    // Kept until the proxy ends: the port stays ours while nothing listens.
    let _reserved = reserved;
    let connections = Arc::new(AtomicU64::new(0));
    let mut said_unbound = false;
    loop {
        let current = *target.borrow_and_update();
        let Some(inner) = current else {
            if target.changed().await.is_err() {
                return;
            }
            continue;
        };
        let listener = match listen_on_held_port(SocketAddr::from(([127, 0, 0, 1], port))) {
            Ok(listener) => listener,
            Err(err) => {
                // Once, not every try: a warning each 20 ms filled stderr.
                if !said_unbound {
                    tracing::warn!("front port {port} cannot be listened on yet: {err}");
                    said_unbound = true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        said_unbound = false;
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    if let Ok((client, _)) = accepted {
                        let n = connections.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(pipe(client, inner, shaping.clone(), n));
                    }
                }
                changed = target.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if *target.borrow() != Some(inner) {
                        break; // the listener closes: refused from now on
                    }
                }
            }
        }
    }
}

/// Resets both sides: whoever reads next sees a reset, not a clean end.
fn reset(client: &TcpStream, upstream: &TcpStream) {
    let _ = client.set_zero_linger();
    let _ = upstream.set_zero_linger();
}

/// Bytes held back until their release time, in order.
#[derive(Default)]
struct Held {
    queue: VecDeque<(Instant, Bytes)>,
    last_release: Option<Instant>,
}

impl Held {
    const LIMIT: usize = 256;

    fn push(&mut self, now: Instant, bytes: Bytes, shaping: &Shaping, rng: &mut StdRng) {
        let jitter = shaping.jitter.as_secs_f64();
        let spread = if jitter > 0.0 {
            rng.random_range(-jitter..=jitter)
        } else {
            0.0
        };
        let hold = (shaping.delay.as_secs_f64() + spread).max(0.0);
        let mut release = now + Duration::from_secs_f64(hold);
        // Never overtake an earlier chunk: TCP delivers in order.
        if let Some(last) = self.last_release {
            release = release.max(last);
        }
        self.last_release = Some(release);
        self.queue.push_back((release, bytes));
    }

    fn next_release(&self) -> Option<Instant> {
        self.queue.front().map(|(at, _)| *at)
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn pipe(
    mut client: TcpStream,
    inner: u16,
    mut shaping: watch::Receiver<Shaping>,
    connection: u64,
) {
    let mut upstream = match TcpStream::connect(("127.0.0.1", inner)).await {
        Ok(upstream) => upstream,
        Err(_) => {
            // The process stopped listening (it is draining or dying): reset,
            // so the client fails at once rather than waiting.
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let mut to_process = Held::default();
    let mut from_process = Held::default();
    let (mut client_open, mut process_open) = (true, true);
    let (mut client_buf, mut process_buf) = (
        BytesMut::with_capacity(16 << 10),
        BytesMut::with_capacity(16 << 10),
    );
    let mut current = *shaping.borrow_and_update();
    let mut rng = StdRng::seed_from_u64(crate::tokens::mix(current.seed ^ connection));
    // The next bytes from the client start a request: the connection is
    // new, or the process has answered since.
    let mut request_starts = true;
    loop {
        if !client_open
            && to_process.queue.is_empty()
            && !process_open
            && from_process.queue.is_empty()
        {
            return;
        }
        tokio::select! {
            read = client.read_buf(&mut client_buf), if client_open && to_process.queue.len() < Held::LIMIT => match read {
                Ok(0) => {
                    client_open = false;
                    if to_process.queue.is_empty() {
                        let _ = upstream.shutdown().await;
                    }
                }
                Ok(_) => {
                    let chunk = client_buf.split().freeze();
                    if std::mem::replace(&mut request_starts, false)
                        && current.loss > 0.0
                        && rng.random_bool(current.loss.clamp(0.0, 1.0))
                    {
                        return reset(&client, &upstream);
                    }
                    if current.both_directions && !current.is_none() {
                        to_process.push(Instant::now(), chunk, &current, &mut rng);
                    } else if !to_process.queue.is_empty() {
                        to_process.push(Instant::now(), chunk, &Shaping::default(), &mut rng);
                    } else if upstream.write_all(&chunk).await.is_err() {
                        return reset(&client, &upstream);
                    }
                }
                Err(_) => return reset(&client, &upstream),
            },
            read = upstream.read_buf(&mut process_buf), if process_open && from_process.queue.len() < Held::LIMIT => match read {
                Ok(0) => {
                    process_open = false;
                    if from_process.queue.is_empty() {
                        let _ = client.shutdown().await;
                    }
                }
                Ok(_) => {
                    let chunk = process_buf.split().freeze();
                    request_starts = true;
                    if !current.is_none() {
                        from_process.push(Instant::now(), chunk, &current, &mut rng);
                    } else if !from_process.queue.is_empty() {
                        // A fault just lifted: what is held goes first.
                        from_process.push(Instant::now(), chunk, &Shaping::default(), &mut rng);
                    } else if client.write_all(&chunk).await.is_err() {
                        return reset(&client, &upstream);
                    }
                }
                Err(_) => return reset(&client, &upstream),
            },
            _ = sleep_until_some(to_process.next_release()) => {
                if let Some((_, chunk)) = to_process.queue.pop_front() {
                    if upstream.write_all(&chunk).await.is_err() {
                        return reset(&client, &upstream);
                    }
                    if !client_open && to_process.queue.is_empty() {
                        let _ = upstream.shutdown().await;
                    }
                }
            }
            _ = sleep_until_some(from_process.next_release()) => {
                if let Some((_, chunk)) = from_process.queue.pop_front() {
                    if client.write_all(&chunk).await.is_err() {
                        return reset(&client, &upstream);
                    }
                    if !process_open && from_process.queue.is_empty() {
                        let _ = client.shutdown().await;
                    }
                }
            }
            changed = shaping.changed() => {
                if changed.is_err() {
                    return;
                }
                current = *shaping.borrow_and_update();
                rng = StdRng::seed_from_u64(crate::tokens::mix(current.seed ^ connection));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delays_what_the_process_sends_and_keeps_the_order() {
        // An echo server stands in for the process.
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_port = echo.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = FrontProxy::new().unwrap();
        proxy.up(echo_port);
        let mut conn = loop {
            if let Ok(c) = TcpStream::connect(("127.0.0.1", proxy.port())).await {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        async fn round_trip(conn: &mut TcpStream, byte: u8) -> Duration {
            let started = Instant::now();
            conn.write_all(&[byte]).await.unwrap();
            let mut got = [0u8; 1];
            conn.read_exact(&mut got).await.unwrap();
            assert_eq!(got[0], byte);
            started.elapsed()
        }
        assert!(round_trip(&mut conn, 1).await < Duration::from_millis(50));
        // Put in force on a connection already open.
        proxy.shape(Shaping {
            delay: Duration::from_millis(150),
            ..Shaping::default()
        });
        let delayed = round_trip(&mut conn, 2).await;
        assert!(
            delayed >= Duration::from_millis(150) && delayed < Duration::from_millis(250),
            "{delayed:?}"
        );
        proxy.shape(Shaping {
            delay: Duration::from_millis(100),
            both_directions: true,
            ..Shaping::default()
        });
        let both = round_trip(&mut conn, 3).await;
        assert!(both >= Duration::from_millis(200), "{both:?}");
        proxy.shape(Shaping::default());
        assert!(round_trip(&mut conn, 4).await < Duration::from_millis(50));
        // Burst: order is kept under jitter.
        proxy.shape(Shaping {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(15),
            ..Shaping::default()
        });
        conn.write_all(&[10, 11, 12, 13, 14, 15, 16, 17])
            .await
            .unwrap();
        let mut got = [0u8; 8];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [10, 11, 12, 13, 14, 15, 16, 17]);
    }

    /// HTTP requests through a proxy with `loss`, one connection each time
    /// a connection is cut; returns how many of `n` failed.
    async fn failed_share(loss: f64, n: usize, seed: u64) -> usize {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        let app = axum::Router::new().route("/", axum::routing::post(|| async { "ok" }));
        tokio::spawn(async move {
            let _ = axum::serve(server, app).await;
        });
        let proxy = FrontProxy::new().unwrap();
        proxy.up(port);
        while TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        proxy.shape(Shaping {
            loss,
            seed,
            ..Shaping::default()
        });
        let client = crate::http::client();
        let url = proxy.url();
        let mut failed = 0;
        for _ in 0..n {
            match client.post(&url).body("hi").send().await {
                Ok(response) if response.status().is_success() => {}
                _ => failed += 1,
            }
        }
        failed
    }

    #[tokio::test]
    async fn loss_cuts_its_share_of_requests() {
        // Within the binomial 99% interval of n = 400 draws (±2.576 σ).
        let n = 400;
        for loss in [0.05, 0.5, 0.95] {
            let failed = failed_share(loss, n, 7).await;
            let mean = loss * n as f64;
            let sigma = (n as f64 * loss * (1.0 - loss)).sqrt();
            assert!(
                (failed as f64 - mean).abs() <= 2.576 * sigma + 1.0,
                "loss {loss}: {failed} of {n} failed, expected {mean} ± {:.1}",
                2.576 * sigma
            );
        }
        assert_eq!(failed_share(0.0, 50, 7).await, 0);
    }

    #[tokio::test]
    async fn refuses_while_down() {
        let proxy = FrontProxy::new().unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            TcpStream::connect(("127.0.0.1", proxy.port()))
                .await
                .is_err()
        );
    }

    /// Whether anything but the proxy can have its port now.
    fn taken_by_another(port: u16) -> bool {
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
    }

    #[tokio::test]
    async fn keeps_its_port_through_down_and_up() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inner = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                let _ = s.write_all(b"hi").await;
            }
        });
        let proxy = FrontProxy::new().unwrap();
        let port = proxy.port();
        assert!(!taken_by_another(port), "reserved before the first up");
        let read_through = || async move {
            for _ in 0..200 {
                if let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)).await {
                    let mut got = [0u8; 2];
                    if conn.read_exact(&mut got).await.is_ok() {
                        return got == *b"hi";
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            false
        };
        let refused = || async move {
            for _ in 0..200 {
                if TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            false
        };
        for round in 0..3 {
            proxy.up(inner);
            assert!(read_through().await, "round {round}: up");
            proxy.down();
            assert!(refused().await, "round {round}: down refuses");
            assert!(
                !taken_by_another(port),
                "round {round}: still held while down"
            );
        }
        drop(proxy);
        // Released once the proxy is gone (its task ends on the next poll).
        let mut released = false;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if taken_by_another(port) {
                released = true;
                break;
            }
        }
        assert!(released, "the port is given back with the proxy");
    }
}
