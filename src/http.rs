//! The one way shakedown makes HTTP clients.
//!
//! reqwest is built here without a default TLS crypto provider (ring is
//! lighter to build than aws-lc); this installs ring once, before the first
//! client, so that `https://` endpoints work from the library and the CLI.

use std::sync::Once;

/// A reqwest client builder with TLS ready.
pub fn client_builder() -> reqwest::ClientBuilder {
    static PROVIDER: Once = Once::new();
    PROVIDER.call_once(|| {
        // Fails only if another provider is already installed: that one serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
}

/// A client with default settings.
pub fn client() -> reqwest::Client {
    client_builder().build().unwrap_or_default()
}

/// The text of an error and all its causes: reqwest's own line alone
/// ("error sending request") does not say what happened.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A listener whose accepted connections have Nagle's algorithm off. An
/// SSE event is a few hundred bytes: with Nagle on, the first token waits
/// for the client's delayed ACK (about 40 ms on Linux) and every TTFT reads
/// that much high.
pub fn without_nagle(
    listener: tokio::net::TcpListener,
) -> axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)> {
    use axum::serve::ListenerExt;
    fn no_delay(tcp: &mut tokio::net::TcpStream) {
        let _ = tcp.set_nodelay(true);
    }
    listener.tap_io(no_delay as fn(&mut tokio::net::TcpStream))
}
