//! TLS on the listening port, in-process with rustls (ring provider), no
//! async runtime: a [`Tls`] holds the current `ServerConfig` and the
//! certificate's fingerprint; a [`TlsStream`] is one session over its TCP
//! socket. The HTTP poll thread reads it non-blocking (the handshake happens
//! there, within the head timeout), a worker reads and writes it blocking
//! (the timeouts are the TCP socket's), and the terminal pump drives it
//! non-blocking (through `Stream` in the `stream` module, a `Link`). Not in
//! macOS builds.
//!
//! Locks: the only lock is the one around the current `ServerConfig` (an
//! `Arc` swapped by [`Tls::reload`] on SIGHUP, on the signal thread). A
//! connection clones the `Arc` under it when it is accepted and lets go
//! before any I/O, so no lock is ever held across a read or a write. A
//! session has no lock at all: it moves with its connection (by value, over
//! the HTTP server's channels) and is only ever touched by the one thread
//! that holds the connection. New connections take the new certificate;
//! open ones keep theirs.
//!
//! Non-blocking TLS ([`Link`], the terminal): a read first takes decrypted
//! bytes rustls already holds, else reads TLS records from the socket
//! (`read_tls`), decrypts them (`process_new_packets`) and tries again; a
//! write first pushes out the records still waiting (`write_tls`) and says
//! `WouldBlock` while any are left, so a client that stops reading stops the
//! writer just as over plain TCP. Decrypted bytes waiting in rustls count as
//! readable (`Link::buffered`), since `poll` on the socket cannot see them.

use rustls::ServerConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where the key and certificate come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// PEM files (a chain, leaf first; a PKCS#8, SEC1 or PKCS#1 key).
    Files { cert: PathBuf, key: PathBuf },
    /// A pair generated once into `dir` (`cert.pem`, `key.pem`) and reused.
    SelfSigned { dir: PathBuf },
}

impl Source {
    pub fn files(&self) -> (PathBuf, PathBuf) {
        match self {
            Source::Files { cert, key } => (cert.clone(), key.clone()),
            Source::SelfSigned { dir } => (dir.join("cert.pem"), dir.join("key.pem")),
        }
    }
}

/// The server's TLS settings, swappable while serving.
pub struct Tls {
    source: Source,
    current: Mutex<(Arc<rustls::ServerConfig>, String)>,
}

impl Tls {
    /// Loads (for `SelfSigned`, first generates) the key and certificate.
    /// `host` is the configured listening host, put in a generated
    /// certificate's names.
    pub fn load(source: Source, host: &str) -> Result<Tls, String> {
        if let Source::SelfSigned { dir } = &source {
            ensure_self_signed(dir, host)?;
        }
        let current = build(&source)?;
        Ok(Tls { source, current: Mutex::new(current) })
    }

    /// Reads the files again; on success new connections use them. Returns
    /// the new fingerprint.
    pub fn reload(&self) -> Result<String, String> {
        let next = build(&self.source)?;
        let fingerprint = next.1.clone();
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(fingerprint)
    }

    /// `sha256:<hex>` of the current certificate's DER.
    pub fn fingerprint(&self) -> String {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).1.clone()
    }

    fn config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.current.lock().unwrap_or_else(|p| p.into_inner()).0)
    }

    /// A server session for one accepted connection (the config as of now).
    pub fn session(&self) -> io::Result<ServerConnection> {
        ServerConnection::new(self.config()).map_err(io::Error::other)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate chain and key of `source`, checked to belong together.
pub fn read_pair(source: &Source) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let (cert, key) = source.files();
    let certs = CertificateDer::pem_file_iter(&cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {}", cert.display(), pem_error(e)))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE in it", cert.display()));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(&key).map_err(|e| format!("{}: {}", key.display(), pem_error(e)))?;
    Ok((certs, key_der))
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => e.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind in it".into(),
        other => format!("not valid PEM ({other:?})"),
    }
}

fn build(source: &Source) -> Result<(Arc<rustls::ServerConfig>, String), String> {
    let (certs, key) = read_pair(source)?;
    let fingerprint = fingerprint(&certs[0]);
    let (cert_path, _) = source.files();
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{}: {}", cert_path.display(), key_error(e)))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), fingerprint))
}

/// What doctor wants to know of a pair: both files read, the key matches
/// the certificate. Returns the fingerprint and the certificate's notAfter
/// (seconds since the epoch, None when it cannot be read).
pub fn inspect(source: &Source) -> Result<(String, Option<i64>), String> {
    let (certs, _) = read_pair(source)?;
    let (_, fingerprint) = build(source)?;
    Ok((fingerprint, not_after(&certs[0])))
}

fn key_error(e: rustls::Error) -> String {
    match e {
        rustls::Error::InconsistentKeys(_) => "the key does not match the certificate".into(),
        other => other.to_string(),
    }
}

/// `sha256:<64 lowercase hex>` of a certificate's DER.
pub fn fingerprint(cert: &[u8]) -> String {
    let digest = Sha256::digest(cert);
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for b in digest.iter() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Generates the self-signed pair into `dir` unless both files are there:
/// ECDSA P-256, CN `aion-connector`, names `host` (unless a wildcard
/// address), `localhost`, `127.0.0.1`, `::1`; valid 2025–2049. The dir is
/// 0700 and the files 0600. Both files are written into a fresh sibling
/// dir that is then renamed into place, so two processes starting at once
/// (the service and `aion-connector fingerprint`) agree on one pair.
pub fn ensure_self_signed(dir: &Path, host: &str) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.exists() && key.exists() {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let tmp = parent.join(format!(".tls-new-{}-{nanos}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let wildcard = matches!(host, "0.0.0.0" | "::" | "[::]" | "");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if !wildcard && !names.iter().any(|n| n == host) {
        names.insert(0, host.to_string());
    }
    let generated = (|| -> Result<(), String> {
        let (key_pem, cert_pem) = self_signed(&names)?;
        for (name, text) in [("key.pem", key_pem), ("cert.pem", cert_pem)] {
            let path = tmp.join(name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    })();
    let placed = generated.and_then(|()| {
        // An empty or missing `dir` is replaced; one another process has
        // just filled is kept (ENOTEMPTY/EEXIST) and ours dropped.
        match std::fs::rename(&tmp, dir) {
            Ok(()) => Ok(()),
            Err(_) if cert.exists() && key.exists() => Ok(()),
            Err(e) => Err(format!("{}: {e}", dir.display())),
        }
    });
    let _ = std::fs::remove_dir_all(&tmp);
    placed
}

/// A new ECDSA P-256 key (PKCS#8) and a self-signed X.509 v3 certificate
/// for `names` (DNS names or IP addresses), both PEM: CN `aion-connector`,
/// valid 2025-01-01 to 2049-12-31, a random serial, subjectAltName only.
/// The DER is written here (a dozen fixed structures) instead of by a crate.
fn self_signed(names: &[String]) -> Result<(String, String), String> {
    use ring::rand::SecureRandom;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
    let fail = |what: &str| format!("generating the self-signed certificate: {what}");
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).map_err(|_| fail("key"))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| fail("key"))?;
    const ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
    let algorithm = tlv(0x30, &tlv(0x06, ECDSA_SHA256));
    let name =
        tlv(0x30, &tlv(0x31, &tlv(0x30, &[tlv(0x06, COMMON_NAME), tlv(0x0c, b"aion-connector")].concat())));
    let mut serial = [0u8; 16];
    rng.fill(&mut serial).map_err(|_| fail("serial"))?;
    serial[0] = (serial[0] & 0x7f) | 0x40; // positive, 16 bytes
    let validity = tlv(0x30, &[tlv(0x17, b"250101000000Z"), tlv(0x17, b"491231000000Z")].concat());
    let public = [&[0u8][..], pair.public_key().as_ref()].concat();
    let spki = tlv(
        0x30,
        &[tlv(0x30, &[tlv(0x06, EC_PUBLIC_KEY), tlv(0x06, P256)].concat()), tlv(0x03, &public)].concat(),
    );
    let mut general_names = Vec::new();
    for n in names {
        match n.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => general_names.extend(tlv(0x87, &ip.octets())),
            Ok(std::net::IpAddr::V6(ip)) => general_names.extend(tlv(0x87, &ip.octets())),
            Err(_) if n.is_ascii() => general_names.extend(tlv(0x82, n.as_bytes())),
            Err(_) => return Err(fail(&format!("the name {n:?} is not ASCII"))),
        }
    }
    let san = tlv(0x30, &[tlv(0x06, SUBJECT_ALT_NAME), tlv(0x04, &tlv(0x30, &general_names))].concat());
    let extensions = tlv(0xa3, &tlv(0x30, &san));
    let tbs = tlv(
        0x30,
        &[
            tlv(0xa0, &tlv(0x02, &[2])), // v3
            tlv(0x02, &serial),
            algorithm.clone(),
            name.clone(),
            validity,
            name,
            spki,
            extensions,
        ]
        .concat(),
    );
    let signature = pair.sign(&rng, &tbs).map_err(|_| fail("signature"))?;
    let bits = [&[0u8][..], signature.as_ref()].concat();
    let cert = tlv(0x30, &[tbs, algorithm, tlv(0x03, &bits)].concat());
    Ok((pem("PRIVATE KEY", pkcs8.as_ref()), pem("CERTIFICATE", &cert)))
}

/// One DER element.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes = n.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// PEM: base64 in lines of 64, between BEGIN and END lines.
fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A certificate's notAfter, in seconds since the epoch (a minimal DER walk:
/// Certificate → TBSCertificate → Validity).
pub fn not_after(cert: &[u8]) -> Option<i64> {
    let (_, tbs_cert, _) = der(cert)?; // Certificate SEQUENCE
    let (_, tbs, _) = der(tbs_cert)?; // TBSCertificate SEQUENCE
    let mut rest = tbs;
    let (tag, _, after) = der(rest)?;
    if tag == 0xA0 {
        rest = after; // [0] version
    }
    for _ in 0..3 {
        rest = der(rest)?.2; // serial, signature, issuer
    }
    let (_, validity, _) = der(rest)?;
    let (_, _, after_before) = der(validity)?;
    let (tag, time, _) = der(after_before)?;
    let text = std::str::from_utf8(time).ok()?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = text.get(..2)?.parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let num = |r: std::ops::Range<usize>| -> Option<i64> { rest.get(r)?.parse().ok() };
    let (month, day, h, m, s) = (num(0..2)?, num(2..4)?, num(4..6)?, num(6..8)?, num(8..10)?);
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// One DER element: (tag, contents, what follows).
fn der(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *bytes.first()?;
    let first = *bytes.get(1)? as usize;
    let (len, head) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in bytes.get(2..2 + n)? {
            len = (len << 8) | *b as usize;
        }
        (len, 2 + n)
    };
    let end = head.checked_add(len)?;
    Some((tag, bytes.get(head..end)?, bytes.get(end..)?))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A rustls server session over its TCP socket.
pub struct TlsStream {
    conn: ServerConnection,
    sock: TcpStream,
    /// Decrypted bytes wait in `conn` (as of the last read).
    pending: bool,
}

impl TlsStream {
    pub fn new(conn: ServerConnection, sock: TcpStream) -> TlsStream {
        TlsStream { conn, sock, pending: false }
    }

    /// Writes waiting TLS records; `WouldBlock` (non-blocking) when the
    /// socket is full with some left.
    fn push(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads and decrypts more records. Ok(false): the peer closed.
    fn pull(&mut self) -> io::Result<bool> {
        let n = loop {
            match self.conn.read_tls(&mut self.sock) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Ok(false);
        }
        match self.conn.process_new_packets() {
            Ok(state) => {
                self.pending = state.plaintext_bytes_to_read() > 0;
            }
            Err(e) => {
                // The alert rustls queued goes out if the socket takes it.
                let _ = self.push();
                return Err(io::Error::new(ErrorKind::InvalidData, e));
            }
        }
        // Handshake messages, key updates: sent as soon as they exist.
        match self.push() {
            Err(e) if e.kind() != ErrorKind::WouldBlock => Err(e),
            _ => Ok(true),
        }
    }

    pub fn sock(&self) -> &TcpStream {
        &self.sock
    }

    /// Decrypted bytes wait in the session.
    pub fn pending(&self) -> bool {
        self.pending
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    pub fn close(&mut self) {
        self.conn.send_close_notify();
        let _ = self.push();
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => {
                    if n > 0 {
                        self.pending =
                            self.conn.process_new_packets().is_ok_and(|s| s.plaintext_bytes_to_read() > 0);
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            self.pending = false;
            if !self.pull()? {
                return Ok(0);
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Records still waiting: the socket is full, the caller waits too.
        self.push()?;
        let n = self.conn.writer().write(buf)?;
        match self.push() {
            Err(e) if e.kind() != ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.push()?;
        self.sock.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_after_of_a_generated_certificate() {
        let dir = std::env::temp_dir().join(format!("aion-tls-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ensure_self_signed(&dir, "example.test").unwrap();
        let tls = Tls::load(Source::SelfSigned { dir: dir.clone() }, "example.test").unwrap();
        let (certs, _) = read_pair(&Source::SelfSigned { dir: dir.clone() }).unwrap();
        assert_eq!(tls.fingerprint(), fingerprint(&certs[0]));
        assert_eq!(tls.fingerprint().len(), 71);
        // 2049-12-31T00:00:00Z
        assert_eq!(not_after(&certs[0]), Some(2_524_521_600));
        // Both PEM files parse again, and the names are there.
        let der = certs[0].as_ref();
        assert!(der.windows(12).any(|w| w == b"example.test"));
        assert!(der.windows(9).any(|w| w == b"localhost"));
        assert_eq!(
            pem("X", b"any carnal pleas"),
            "-----BEGIN X-----\nYW55IGNhcm5hbCBwbGVhcw==\n-----END X-----\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
