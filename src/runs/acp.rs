//! Reading acpx's `--format json` output the way the Node connector v0.3.3
//! does: each stdout line is classified as message text, the end of the
//! turn, an ACP update worth an `event`, other JSON, or plain text.

use serde_json::{Map, Value};

/// What one line of acpx's stdout is.
#[derive(Debug, PartialEq)]
pub enum Line {
    /// A piece of the agent's message text (possibly empty: nothing to post).
    Text(String),
    /// A JSON-RPC result with `result.stopReason == "end_turn"`.
    EndTurn,
    /// Another ACP update (tool call, plan, thought…) or a request of the
    /// agent to the client: what an `event` post carries.
    Event(Value),
    /// Any other JSON (acpx's own traffic, other results): nothing.
    Other,
    /// Not JSON (or `null`): part of the summary, never posted.
    Plain,
}

/// Methods an agent calls on its client, posted as events (`{"method","params"}`).
fn agent_request(method: &str) -> bool {
    method == "session/request_permission" || method.starts_with("fs/") || method.starts_with("terminal/")
}

/// Classifies one line (without its newline). Blank lines are for the caller to skip.
pub fn classify(line: &str) -> Line {
    let value: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(_) => return Line::Plain,
    };
    let Value::Object(obj) = value else {
        // The original reads `.type` of the value: `null` throws (plain text),
        // a number, string, boolean or array has none (other JSON).
        return if value.is_null() { Line::Plain } else { Line::Other };
    };
    let result = obj.get("result").and_then(Value::as_object);
    if result.and_then(|r| r.get("stopReason")).and_then(Value::as_str) == Some("end_turn") {
        return Line::EndTurn;
    }
    let update = obj.get("params").and_then(|p| p.get("update"));
    if let Some(Value::Object(u)) = update
        && u.get("sessionUpdate").and_then(Value::as_str) == Some("agent_message_chunk")
    {
        let text = u.get("content").and_then(|c| c.get("text")).and_then(Value::as_str);
        return Line::Text(text.unwrap_or("").to_string());
    }
    if let Some(text) = text_shape(&obj) {
        return Line::Text(text);
    }
    match obj.get("method").and_then(Value::as_str) {
        Some("session/update") => match update {
            Some(u @ Value::Object(_)) => Line::Event(u.clone()),
            _ => Line::Other,
        },
        Some(m) if agent_request(m) => {
            let mut event = Map::new();
            event.insert("method".into(), m.into());
            event.insert("params".into(), obj.get("params").cloned().unwrap_or(Value::Null));
            Line::Event(Value::Object(event))
        }
        _ => Line::Other,
    }
}

/// `{"type":"text_delta"|"text","delta"|"text":…}` and `{"type":"agent_message","content":…}`.
fn text_shape(obj: &Map<String, Value>) -> Option<String> {
    let string = |k: &str| obj.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    match obj.get("type").and_then(Value::as_str)? {
        "text_delta" | "text" => Some(string("delta").or_else(|| string("text")).unwrap_or("").to_string()),
        "agent_message" => string("content").map(str::to_string),
        _ => None,
    }
}

/// The tool calls of a turn still under way: a `tool_call` update opens one
/// (by `toolCallId`), a `tool_call_update` (or the `tool_call` itself) with
/// status `completed` or `failed` closes it. While one is open the agent may
/// be silent for long (a build), and the idle rule waits.
#[derive(Default)]
pub struct OpenTools {
    ids: std::collections::HashSet<String>,
}

/// At most this many open tool calls are tracked (an agent never closing
/// them cannot grow the set without end; the idle rule then just waits).
const OPEN_TOOLS_MAX: usize = 4096;

impl OpenTools {
    /// Takes note of one ACP update (an [`Line::Event`]).
    pub fn see(&mut self, update: &Value) {
        let kind = update.get("sessionUpdate").and_then(Value::as_str);
        if !matches!(kind, Some("tool_call" | "tool_call_update")) {
            return;
        }
        let id = update.get("toolCallId").and_then(Value::as_str).unwrap_or("");
        let done = matches!(update.get("status").and_then(Value::as_str), Some("completed" | "failed"));
        if done {
            self.ids.remove(id);
        } else if kind == Some("tool_call") && self.ids.len() < OPEN_TOOLS_MAX {
            self.ids.insert(id.to_string());
        }
    }

    pub fn any(&self) -> bool {
        !self.ids.is_empty()
    }

    pub fn clear(&mut self) {
        self.ids.clear();
    }
}

/// A turn's text as the original keeps it: message text and non-JSON lines,
/// concatenated as they came, with nothing in between (capped).
#[derive(Default)]
pub struct Summary {
    pub text: String,
    capped: bool,
}

/// Keep at most this much of a summary.
pub const SUMMARY_CAP: usize = 1 << 20;

impl Summary {
    pub fn push(&mut self, s: &str) {
        if self.capped {
            return;
        }
        if self.text.len() + s.len() > SUMMARY_CAP {
            let room = SUMMARY_CAP - self.text.len();
            self.text.push_str(&s[..s.floor_char_boundary(room)]);
            self.capped = true;
        } else {
            self.text.push_str(s);
        }
    }

    /// Blank (whitespace only): an empty turn.
    pub fn blank(&self) -> bool {
        self.text.trim().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_four_text_shapes_and_nothing_else() {
        let chunk = r#"{"jsonrpc":"2.0","method":"session/update","params":{"sessionId":"s","update":{"sessionUpdate":"agent_message_chunk","content":{"type":"text","text":"Hello, "}}}}"#;
        assert_eq!(classify(chunk), Line::Text("Hello, ".into()));
        assert_eq!(classify(r#"{"type":"text_delta","delta":"world"}"#), Line::Text("world".into()));
        assert_eq!(classify(r#"{"type":"text","text":"!"}"#), Line::Text("!".into()));
        assert_eq!(classify(r#"{"type":"text_delta","delta":"","text":"t"}"#), Line::Text("t".into()));
        assert_eq!(classify(r#"{"type":"agent_message","content":"m"}"#), Line::Text("m".into()));
        assert_eq!(classify(r#"{"type":"agent_message","content":{"x":1}}"#), Line::Other);
        // A bare update (no params.update) and other message types are not text.
        assert_eq!(
            classify(r#"{"sessionUpdate":"agent_message_chunk","content":{"type":"text","text":"BARE"}}"#),
            Line::Other
        );
        assert_eq!(classify(r#"{"type":"message","text":"no"}"#), Line::Other);
        assert_eq!(classify(r#"{"type":"assistant","content":"no"}"#), Line::Other);
        // A chunk without text is an empty piece.
        let no_text = r#"{"method":"session/update","params":{"update":{"sessionUpdate":"agent_message_chunk","content":{"type":"image"}}}}"#;
        assert_eq!(classify(no_text), Line::Text(String::new()));
    }

    #[test]
    fn end_turn_events_other_and_plain() {
        assert_eq!(classify(r#"{"jsonrpc":"2.0","id":2,"result":{"stopReason":"end_turn"}}"#), Line::EndTurn);
        assert_eq!(classify(r#"{"jsonrpc":"2.0","id":2,"result":{"stopReason":"cancelled"}}"#), Line::Other);
        let tool = r#"{"jsonrpc":"2.0","method":"session/update","params":{"sessionId":"s","update":{"sessionUpdate":"tool_call","toolCallId":"t1","title":"x"}}}"#;
        assert_eq!(
            classify(tool),
            Line::Event(json!({"sessionUpdate":"tool_call","toolCallId":"t1","title":"x"}))
        );
        let perm = r#"{"jsonrpc":"2.0","id":7,"method":"session/request_permission","params":{"sessionId":"s","options":[]}}"#;
        assert_eq!(
            classify(perm),
            Line::Event(
                json!({"method":"session/request_permission","params":{"sessionId":"s","options":[]}})
            )
        );
        assert_eq!(classify(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#), Line::Other);
        assert_eq!(classify(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#), Line::Other);
        assert_eq!(classify("5"), Line::Other);
        assert_eq!(classify("[1]"), Line::Other);
        assert_eq!(classify("null"), Line::Plain);
        assert_eq!(classify("plain line"), Line::Plain);
        assert_eq!(classify("{not json"), Line::Plain);
    }

    #[test]
    fn a_tool_call_is_open_until_its_update_says_completed_or_failed() {
        let mut open = OpenTools::default();
        open.see(&json!({"sessionUpdate":"tool_call","toolCallId":"a","status":"pending"}));
        open.see(&json!({"sessionUpdate":"tool_call","toolCallId":"b"}));
        assert!(open.any());
        open.see(&json!({"sessionUpdate":"tool_call_update","toolCallId":"a","status":"in_progress"}));
        open.see(&json!({"sessionUpdate":"plan","entries":[]}));
        open.see(&json!({"sessionUpdate":"tool_call_update","toolCallId":"a","status":"completed"}));
        assert!(open.any(), "b is still open");
        open.see(&json!({"sessionUpdate":"tool_call_update","toolCallId":"b","status":"failed"}));
        assert!(!open.any());
        // Opened and done in one update; an update of an unknown call.
        open.see(&json!({"sessionUpdate":"tool_call","toolCallId":"c","status":"completed"}));
        open.see(&json!({"sessionUpdate":"tool_call_update","toolCallId":"z","status":"pending"}));
        assert!(!open.any());
        open.see(&json!({"sessionUpdate":"tool_call","toolCallId":"d"}));
        open.clear();
        assert!(!open.any());
    }

    #[test]
    fn the_summary_is_concatenated_as_it_came() {
        let mut s = Summary::default();
        for line in [
            r#"{"method":"session/update","params":{"update":{"sessionUpdate":"agent_message_chunk","content":{"type":"text","text":"Hello, "}}}}"#,
            "plain line",
            r#"{"method":"session/update","params":{"update":{"sessionUpdate":"tool_call"}}}"#,
            r#"{"type":"text_delta","delta":"world"}"#,
            r#"{"type":"agent_message","content":"!"}"#,
            r#"{"sessionUpdate":"agent_message_chunk","content":{"type":"text","text":"BARE"}}"#,
        ] {
            match classify(line) {
                Line::Text(t) => s.push(&t),
                Line::Plain => s.push(line),
                _ => {}
            }
        }
        assert_eq!(s.text, "Hello, plain lineworld!");
        assert!(!s.blank());
        assert!(Summary { text: " \n".into(), capped: false }.blank());
    }
}
