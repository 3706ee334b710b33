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
