//! The TCP proxy in front of every local process: a stable address, like a
//! pod's, whatever process is behind it now.
//!
//! It listens only while a process is up behind it, so a connection to a
//! dead replica is refused as a connection to a dead pod would be. When the
//! process behind it dies, its connections end as that process's sockets
//! do. Network faults act here later; for now it passes bytes untouched.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct FrontProxy {
    port: u16,
    target: watch::Sender<Option<u16>>,
    task: JoinHandle<()>,
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot find a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

fn bind(port: u16) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    // The port is re-bound each time the process behind comes back.
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(1024)
}

impl FrontProxy {
    /// Reserves a front port; nothing listens on it until [`FrontProxy::up`].
    pub fn new() -> anyhow::Result<Self> {
        let port = free_port()?;
        let (target, rx) = watch::channel(None);
        let task = tokio::spawn(serve(port, rx));
        Ok(Self { port, target, task })
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
}

impl Drop for FrontProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(port: u16, mut target: watch::Receiver<Option<u16>>) {
    loop {
        let current = *target.borrow_and_update();
        let Some(inner) = current else {
            if target.changed().await.is_err() {
                return;
            }
            continue;
        };
        let listener = match bind(port) {
            Ok(listener) => listener,
            Err(err) => {
                tracing::warn!("front port {port} cannot be bound yet: {err}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    if let Ok((client, _)) = accepted {
                        tokio::spawn(pipe(client, inner));
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

async fn pipe(mut client: TcpStream, inner: u16) {
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
    if tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .is_err()
    {
        // One side was reset: reset the other too, rather than a clean close
        // that could pass for a complete response.
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
}
