//! Small text helpers shared by several concerns: UTF-8 decoding of a byte
//! stream cut at arbitrary points, and credentials taken out of URLs before
//! a log line or an error message shows them.

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

#[cfg(test)]
mod tests {
    use super::*;

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
