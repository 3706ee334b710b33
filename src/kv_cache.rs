//! `shakedown kv-cache`: an emulated KV-cache server beside the engines, as
//! LMCache's server is beside vLLM engines in production-stack. It keeps
//! which conversation prefixes have their KV cache stored, nothing more:
//! an engine asks whether a prefix is there (`GET /kv/KEY`, 200 or 404)
//! and stores one after a request (`PUT /kv/KEY`). With it up, later
//! rounds of a conversation skip most of their prefill; down or frozen,
//! every request pays the whole prefill again: slower, never failed.
//!
//! Start at [`serve`]. The engine's side is [`Client`].

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;

/// The server's settings, as `shakedown kv-cache --help` shows them.
#[derive(Debug, Clone, clap::Args)]
pub struct KvCacheArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8100)]
    pub port: u16,
    /// How many prefixes are kept; the oldest goes first.
    #[arg(long, default_value_t = 100_000)]
    pub capacity: usize,
}

#[derive(Default)]
struct Store {
    keys: HashSet<u64>,
    order: VecDeque<u64>,
}

struct Cache {
    store: Mutex<Store>,
    capacity: usize,
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    args: KvCacheArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cache = Arc::new(Cache {
        store: Mutex::new(Store::default()),
        capacity: args.capacity.max(1),
    });
    let app = Router::new()
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/kv/{key}", get(lookup).put(store))
        .with_state(cache);
    axum::serve(crate::http::without_nagle(listener), app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("kv-cache server failed")
}

async fn lookup(State(cache): State<Arc<Cache>>, Path(key): Path<u64>) -> StatusCode {
    let found = cache
        .store
        .lock()
        .map(|store| store.keys.contains(&key))
        .unwrap_or(false);
    if found {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

async fn store(State(cache): State<Arc<Cache>>, Path(key): Path<u64>) -> StatusCode {
    if let Ok(mut store) = cache.store.lock()
        && store.keys.insert(key)
    {
        store.order.push_back(key);
        while store.order.len() > cache.capacity {
            if let Some(old) = store.order.pop_front() {
                store.keys.remove(&old);
            }
        }
    }
    StatusCode::NO_CONTENT
}

/// The key of a conversation: FNV-1a over each message's role and text,
/// so an engine finds the prefix another engine stored.
pub fn conversation_key<'a>(messages: impl IntoIterator<Item = (&'a str, &'a str)>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (role, text) in messages {
        eat(role.as_bytes());
        eat(&[0]);
        eat(text.as_bytes());
        eat(&[0]);
    }
    hash
}

/// An engine's client of the cache: short deadlines, so a cache that is
/// down or hung costs a miss, not a stalled request.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    url: String,
}

/// How long a lookup may take before it counts as a miss.
const LOOKUP_DEADLINE: Duration = Duration::from_millis(100);

impl Client {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            http: crate::http::client_builder()
                .timeout(LOOKUP_DEADLINE)
                .build()
                .context("cannot build the KV-cache client")?,
            url: url.trim_end_matches('/').to_string(),
        })
    }

    /// Whether the cache holds this prefix; any failure is a miss.
    pub async fn holds(&self, key: u64) -> bool {
        matches!(
            self.http.get(format!("{}/kv/{key}", self.url)).send().await,
            Ok(response) if response.status() == StatusCode::OK
        )
    }

    /// Stores a prefix, in the background; a failure is simply not stored.
    pub fn put(&self, key: u64) {
        let (http, url) = (self.http.clone(), format!("{}/kv/{key}", self.url));
        tokio::spawn(async move {
            let _ = http.put(url).send().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_and_its_continuation_share_the_prefix_key() {
        let first = [("user", "hi"), ("assistant", " a b")];
        let later = conversation_key(first);
        assert_eq!(
            later,
            conversation_key([("user", "hi"), ("assistant", " a b")])
        );
        assert_ne!(
            later,
            conversation_key([("user", "hi"), ("assistant", " a c")])
        );
        assert_ne!(
            conversation_key([("user", "ab")]),
            conversation_key([("user", "a"), ("user", "b")])
        );
    }

    #[tokio::test]
    async fn stores_looks_up_and_forgets_the_oldest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let args = KvCacheArgs {
            host: "127.0.0.1".into(),
            port: 0,
            capacity: 2,
        };
        tokio::spawn(serve(listener, args, std::future::pending()));
        let client = Client::new(&url).unwrap();
        let http = crate::http::client();
        for key in [1u64, 2, 3] {
            http.put(format!("{url}/kv/{key}")).send().await.unwrap();
        }
        assert!(!client.holds(1).await, "the oldest went at capacity");
        assert!(client.holds(2).await && client.holds(3).await);
        let down = Client::new("http://127.0.0.1:9").unwrap();
        assert!(!down.holds(2).await, "a cache that is down is a miss");
    }
}
