//! Getting posts to the platform: [`outbox`] spools each stream of records to
//! disk and delivers them in order with retries, [`client`] is the HTTP client
//! it posts with, [`signing`] the HMAC-SHA256 both modes sign with.
//! The outbox's threads are described in its module doc.

pub mod client;
pub mod outbox;
pub mod signing;
mod spool;
