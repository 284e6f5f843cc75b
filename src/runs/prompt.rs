//! The prompt an agent is given, composed as the Node connector v0.3.3 does:
//! each context part the platform sent, tagged, in a fixed order, joined by
//! one blank line, then a blank line and the user's prompt.

/// One item of `payload.history`: `role`, else `source`, else `user`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryItem {
    pub role: Option<String>,
    pub source: Option<String>,
    pub text: String,
}

/// The context parts of an invoke (an empty string counts as absent).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Context {
    pub system: Option<String>,
    pub memory: Option<String>,
    pub instructions: Option<String>,
    pub history: Vec<HistoryItem>,
}

/// The largest argument execve accepts (Linux: MAX_ARG_STRLEN, NUL included).
pub const MAX_ARGUMENT: usize = 32 * 4096 - 1;

/// `<system>…</system>`, `<project-notes>…</project-notes>`,
/// `<chat-instructions>…</chat-instructions>`, `<recent-messages>…</recent-messages>`,
/// each present part once, joined by "\n\n", then "\n\n" and `prompt`.
pub fn compose(ctx: &Context, prompt: &str) -> String {
    let present = |s: &Option<String>| s.as_deref().filter(|s| !s.is_empty()).map(str::to_string);
    let mut parts: Vec<String> = Vec::new();
    if let Some(s) = present(&ctx.system) {
        parts.push(format!("<system>\n{s}\n</system>"));
    }
    if let Some(m) = present(&ctx.memory) {
        parts.push(format!("<project-notes>\n{m}\n</project-notes>"));
    }
    if let Some(i) = present(&ctx.instructions) {
        parts.push(format!("<chat-instructions>\n{i}\n</chat-instructions>"));
    }
    if !ctx.history.is_empty() {
        let lines: Vec<String> = ctx
            .history
            .iter()
            .map(|item| {
                let role =
                    present(&item.role).or_else(|| present(&item.source)).unwrap_or_else(|| "user".into());
                format!("{role}: {}", item.text)
            })
            .collect();
        parts.push(format!("<recent-messages>\n{}\n</recent-messages>", lines.join("\n")));
    }
    if parts.is_empty() {
        return prompt.to_string();
    }
    format!("{}\n\n{prompt}", parts.join("\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(role: Option<&str>, source: Option<&str>, text: &str) -> HistoryItem {
        HistoryItem { role: role.map(Into::into), source: source.map(Into::into), text: text.into() }
    }

    #[test]
    fn composes_byte_for_byte_as_the_node_connector() {
        let ctx = Context {
            system: Some("SYS".into()),
            memory: Some("MEM".into()),
            instructions: Some("INS".into()),
            history: vec![
                item(Some("assistant"), None, "a1"),
                item(None, Some("human"), "h1"),
                item(None, None, "u1"),
                item(Some(""), Some(""), "e1"),
            ],
        };
        assert_eq!(
            compose(&ctx, "do it"),
            "<system>\nSYS\n</system>\n\n<project-notes>\nMEM\n</project-notes>\n\n\
             <chat-instructions>\nINS\n</chat-instructions>\n\n<recent-messages>\nassistant: a1\n\
             human: h1\nuser: u1\nuser: e1\n</recent-messages>\n\ndo it"
        );
    }

    #[test]
    fn absent_and_empty_parts_are_left_out() {
        assert_eq!(compose(&Context::default(), "p"), "p");
        let ctx = Context { system: Some(String::new()), memory: Some("M".into()), ..Context::default() };
        assert_eq!(compose(&ctx, "p"), "<project-notes>\nM\n</project-notes>\n\np");
    }
}
