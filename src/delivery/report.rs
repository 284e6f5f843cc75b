//! The outbox as the `status` answers of both modes show it (push mode's
//! `serve::status`, poll mode's), so that `aion-connector status` prints one
//! backlog whichever mode answers.

use super::outbox::Outbox;
use serde_json::{Value, json};
use std::time::Duration;

/// Seconds, to a tenth.
pub fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

/// `{"streams","delivered","retried","dropped","spooledRecords","spooledBytes",
/// "memoryRecords","diskError","origins":[{"origin","streams","records","bytes",
/// "oldestPendingSeconds","lastError","downSeconds"}]}`: the outbox's
/// counters and its backlog per origin.
pub fn outbox(outbox: &Outbox) -> Value {
    let stats = outbox.stats();
    let origins: Vec<Value> = outbox
        .origins()
        .iter()
        .map(|o| {
            json!({
                "origin": o.origin,
                "streams": o.streams,
                "records": o.records,
                "bytes": o.bytes,
                "oldestPendingSeconds": o.oldest_failing.map(secs),
                "lastError": o.last_error,
                "downSeconds": o.down_for.map(secs),
            })
        })
        .collect();
    json!({
        "streams": stats.streams,
        "delivered": stats.delivered,
        "retried": stats.retried,
        "dropped": stats.dropped,
        "spooledRecords": stats.spooled_records,
        "spooledBytes": stats.spooled_bytes,
        "memoryRecords": stats.memory_records,
        "diskError": stats.disk_error,
        "origins": origins,
    })
}
