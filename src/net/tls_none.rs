//! macOS builds have no TLS (ring needs a C cross-compiler to check them):
//! the config refuses a `tls` section, so no [`Tls`] ever exists and the
//! code that would use one compiles to nothing.

pub enum Tls {}

impl Tls {
    pub fn fingerprint(&self) -> String {
        match *self {}
    }
    pub fn reload(&self) -> Result<String, String> {
        match *self {}
    }
}
