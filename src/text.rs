//! Small text helpers shared by several concerns: UTF-8 decoding of a byte
//! stream cut at arbitrary points, credentials taken out of URLs before
//! a log line or an error message shows them, known secrets replaced by
//! `[redacted]` before text leaves the machine, and decimal numbers appended
//! to a buffer without `core::fmt` (the request path).

use std::borrow::Cow;

/// Secrets shorter than this are not redacted: a short value ("1", "true",
/// "main") also occurs in ordinary text, and replacing every occurrence would
/// garble the output and, by where `[redacted]` appears, tell the value anyway.
pub const MIN_SECRET: usize = 8;

/// What replaces a secret.
pub const REDACTED: &str = "[redacted]";

/// `n` in decimal appended to `out`: one copy, where `write!` makes one per
/// piece (a call each in musl's `memcpy`).
pub fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(digits(n, &mut [0u8; 20]));
}

/// `n` in decimal, written at the end of `buf`.
fn digits(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// A socket address as its `Display` writes it, handed on in one piece:
/// `Display` of an IPv4 address writes every number and dot apart (each a
/// `memcpy` call on musl), and the log line of every request shows the peer.
pub struct PeerText(pub std::net::SocketAddr);

impl std::fmt::Display for PeerText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let std::net::SocketAddr::V4(addr) = self.0 else {
            return std::fmt::Display::fmt(&self.0, f);
        };
        // `255.255.255.255:65535` at most; digits stored one by one.
        let mut buf = [0u8; 21];
        let mut at = 0;
        for (i, octet) in addr.ip().octets().into_iter().enumerate() {
            if i > 0 {
                buf[at] = b'.';
                at += 1;
            }
            at = put_digits(&mut buf, at, u32::from(octet));
        }
        buf[at] = b':';
        at = put_digits(&mut buf, at + 1, u32::from(addr.port()));
        f.write_str(std::str::from_utf8(&buf[..at]).unwrap_or_default())
    }
}

/// `n` in decimal into `buf` at `at`; returns where it ends.
fn put_digits(buf: &mut [u8], at: usize, n: u32) -> usize {
    let mut tmp = [0u8; 20];
    let d = digits(u64::from(n), &mut tmp);
    buf[at..at + d.len()].copy_from_slice(d);
    at + d.len()
}

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

/// Where to cut `text` so that no secret is split between what is posted
/// now (before the cut) and what comes next: the start of the longest end of
/// `text` that is a proper beginning of one of `secrets`, moved back before
/// any whole secret it would cut; `text.len()` when nothing need wait. What
/// is held is shorter than the longest secret unless secrets overlap.
pub fn held_tail(text: &str, secrets: &[String]) -> usize {
    let bytes = text.as_bytes();
    let mut cut = bytes.len();
    for s in secrets {
        let s = s.as_bytes();
        let longest = (s.len() - 1).min(bytes.len());
        if let Some(k) = (1..=longest).rev().find(|&k| bytes.ends_with(&s[..k])) {
            cut = cut.min(bytes.len() - k);
        }
    }
    // A whole secret across the cut (secrets that overlap) waits too.
    loop {
        let across = secrets.iter().find_map(|s| {
            let from = cut.saturating_sub(s.len() - 1);
            text[floor(text, from)..]
                .match_indices(s.as_str())
                .map(|(i, _)| floor(text, from) + i)
                .find(|&i| i < cut && i + s.len() > cut)
        });
        match across {
            Some(i) => cut = i,
            None => break,
        }
    }
    floor(text, cut)
}

/// The nearest char boundary at or before `i`.
fn floor(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
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

    /// Every way of cutting a text with secrets into two pieces, through
    /// [`held_tail`] as a stream does, posts it redacted whole.
    fn streamed(pieces: &[&str], s: &[String]) -> (String, Vec<String>) {
        let mut held = String::new();
        let mut posts = Vec::new();
        for p in pieces {
            held.push_str(p);
            let cut = held_tail(&held, s);
            let rest = held.split_off(cut);
            if !held.is_empty() {
                posts.push(redact(&held, s).into_owned());
            }
            held = rest;
        }
        if !held.is_empty() {
            posts.push(redact(&held, s).into_owned());
        }
        (posts.concat(), posts)
    }

    #[test]
    fn a_secret_split_between_pieces_is_held_back_until_whole() {
        let s = secrets(["sk-live-1234", "sk-live-1234-extra", "12345678", "5678abcdef", "ключ-секрет"]);
        for text in [
            "a sk-live-1234-extra b sk-live-1234 c",
            "x12345678abcdef y",
            "5678abcdef12345678",
            "é ключ-секрет ü sk-live-12",
        ] {
            let whole = redact(text, &s).into_owned();
            for cut in (0..=text.len()).filter(|&c| text.is_char_boundary(c)) {
                let (got, posts) = streamed(&[&text[..cut], &text[cut..]], &s);
                assert_eq!(got, whole, "{text:?} cut at {cut}: {posts:?}");
            }
        }
        // Text that cannot begin a secret goes at once, whole.
        let (_, posts) = streamed(&["hello ", "world sk-", "live-1234 done"], &s);
        assert_eq!(posts, ["hello ", "world ", "[redacted] done"]);
    }

    #[test]
    fn peers_as_display_writes_them() {
        for peer in [
            "0.0.0.0:0",
            "127.0.0.1:8080",
            "255.255.255.255:65535",
            "10.2.30.4:9",
            "[::1]:443",
            "[fe80::1]:1",
        ] {
            let addr: std::net::SocketAddr = peer.parse().unwrap();
            assert_eq!(PeerText(addr).to_string(), addr.to_string());
            assert_eq!(PeerText(addr).to_string(), peer);
        }
    }

    #[test]
    fn decimals_as_format_writes_them() {
        for n in [0, 1, 9, 10, 99, 100, 404, 65535, 1 << 32, u64::MAX - 1, u64::MAX] {
            let mut out = b"x".to_vec();
            push_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
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
