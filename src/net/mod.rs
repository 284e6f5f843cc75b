//! The listening side of the network: [`http`] accepts connections and parses
//! HTTP/1.1 requests for a [`http::Handler`], [`ws`] speaks WebSocket frames on
//! an upgraded connection. Neither knows what the requests mean.

pub mod http;
pub mod ws;
