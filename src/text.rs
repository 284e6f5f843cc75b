//! Small text helpers shared by several concerns: UTF-8 decoding of a byte
//! stream cut at arbitrary points, credentials taken out of URLs before
//! a log line or an error message shows them, and known secrets replaced by
//! `[redacted]` before text leaves the machine.

use std::borrow::Cow;

/// Secrets shorter than this are not redacted: a short value ("1", "true",
/// "main") also occurs in ordinary text, and replacing every occurrence would
/// garble the output and, by where `[redacted]` appears, tell the value anyway.
pub const MIN_SECRET: usize = 8;

/// What replaces a secret.
pub const REDACTED: &str = "[redacted]";

/// The values worth redacting: at least [`MIN_SECRET`] bytes, each once,
/// longest first (so a secret that contains another goes whole).
pub fn secrets<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> =
        values.into_iter().filter(|v| v.len() >= MIN_SECRET).map(str::to_string).collect();
    out.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    out.dedup();
    out
}

/// `text` with every occurrence of each of `secrets` (from [`secrets`])
/// replaced by [`REDACTED`]; borrowed when there is none.
pub fn redact<'a>(text: &'a str, secrets: &[String]) -> Cow<'a, str> {
    let mut out = Cow::Borrowed(text);
    for s in secrets {
        if out.contains(s.as_str()) {
            out = Cow::Owned(out.replace(s.as_str(), REDACTED));
        }
    }
    out
}

/// Decodes `bytes` after `carry` as UTF-8 for a text frame: a sequence cut
/// at the end waits in `carry` for the next read; invalid bytes become U+FFFD.
pub fn utf8_chunk(carry: &mut Vec<u8>, bytes: &[u8]) -> String {
    carry.extend_from_slice(bytes);
    let mut out = String::with_capacity(carry.len());
    let mut rest: &[u8] = carry;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).expect("valid up to here"));
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        rest = &bad[n..];
                    }
                    None => {
                        rest = bad; // incomplete at the end: keep for next time
                        break;
                    }
                }
            }
        }
    }
    let keep = rest.to_vec();
    *carry = keep;
    out
}

/// `scheme://user:pass@host` → `scheme://***@host`, wherever it appears.
pub fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let end =
            rest.find(|c: char| c == '/' || c.is_whitespace() || c == '\'' || c == '"').unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            out.push_str("***");
            rest = &rest[at..];
        }
    }
    out.push_str(rest);
    out
}

/// `%XX` sequences decoded (invalid ones kept as they are); `+` becomes a
/// space when `plus_is_space` (query strings), not in a url's userinfo.
pub fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let hex = |j: usize| bytes.get(j).and_then(|b| (*b as char).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
            (b'+', _, _) if plus_is_space => out.push(b' '),
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_longest_first_and_short_values_kept() {
        let s = secrets(["sk-live-1234", "sk-live-1234-extra", "short", "sk-live-1234"]);
        assert_eq!(s, ["sk-live-1234-extra", "sk-live-1234"]);
        assert_eq!(
            redact("a sk-live-1234-extra b sk-live-1234 c short", &s),
            "a [redacted] b [redacted] c short"
        );
        assert!(matches!(redact("nothing here", &s), Cow::Borrowed(_)));
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(
            redact_userinfo("fatal: https://u:p@h/x and ssh://git@h"),
            "fatal: https://***@h/x and ssh://***@h"
        );
    }

    #[test]
    fn utf8_split_across_reads_is_joined() {
        let text = "añ€😀";
        let bytes = text.as_bytes();
        for cut in 0..=bytes.len() {
            let mut carry = Vec::new();
            let mut got = utf8_chunk(&mut carry, &bytes[..cut]);
            got.push_str(&utf8_chunk(&mut carry, &bytes[cut..]));
            assert_eq!(got, text, "cut at {cut}");
            assert!(carry.is_empty());
        }
        let mut carry = Vec::new();
        assert_eq!(utf8_chunk(&mut carry, b"a\xffb"), "a\u{FFFD}b");
    }
}
