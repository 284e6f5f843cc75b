//! Getting posts to the platform: [`outbox`] spools each stream of records to
//! disk and delivers them in order with retries, [`client`] is the HTTP client
//! it posts with, [`signing`] the HMAC-SHA256 both modes sign with; [`report`] shows the
//! backlog in the `status` answers of both modes.
//! The outbox's threads are described in its module doc.

pub mod client;
pub mod outbox;
pub mod report;
pub mod signing;
mod spool;
