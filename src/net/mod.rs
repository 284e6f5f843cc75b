//! The listening side of the network: [`http`] accepts connections and parses
//! HTTP/1.1 requests for a [`http::Handler`], over plain TCP or TLS
//! ([`stream`], [`tls`]), [`ws`] speaks WebSocket frames on an upgraded
//! connection, [`local`] frames JSON lines on the connector's Unix socket
//! (and names its operations). None knows what the requests mean.

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub mod epoll_compat;
pub mod http;
pub mod local;
pub mod stream;
#[cfg(not(target_os = "macos"))]
pub mod tls;
#[cfg(target_os = "macos")]
#[path = "tls_none.rs"]
pub mod tls;
pub mod ws;
