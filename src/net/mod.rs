//! The listening side of the network: [`http`] accepts connections and parses
//! HTTP/1.1 requests for a [`http::Handler`], [`ws`] speaks WebSocket frames on
//! an upgraded connection, [`local`] frames JSON lines on the connector's
//! Unix socket (and names its operations). None knows what the requests mean.

pub mod http;
pub mod local;
pub mod ws;
