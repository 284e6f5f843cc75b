//! Signatures on what the connector sends: HMAC-SHA256 keyed with a token the
//! receiver shares. Push mode signs the body (`X-Aion-Signature`); poll mode
//! signs `timestamp + "." + body` (`X-Timestamp`, `X-Signature`).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// `sha256=<hex>` of HMAC-SHA256(key, parts concatenated).
pub fn sha256_hex(key: &[u8], parts: &[&[u8]]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4231_case_2() {
        let sig = sha256_hex(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(sig, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
