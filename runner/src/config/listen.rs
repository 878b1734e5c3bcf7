//! `[[listen]]`: the daemon's listeners as written in the config, and as checked
//! (a Unix socket with its mode and group, or TCP with TLS and client certificates).

use std::path::PathBuf;

use serde::Deserialize;

use crate::config::DEFAULT_SOCKET_MODE;
use crate::error::{Result, RunnerError};

/// One `[[listen]]` entry as written: a Unix socket (`unix`, with `mode` and
/// `socket_gid`) or a TLS listener on TCP (`tcp`, with `tls_cert`, `tls_key` and
/// `client_ca`, all required: there is no plaintext TCP).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub unix: Option<PathBuf>,
    /// The socket file's permission bits, e.g. "0660" (a TOML string of octal digits,
    /// or an integer such as 0o660).
    pub mode: Option<SocketMode>,
    pub socket_gid: Option<u32>,
    /// `ADDR:PORT` with a literal address, e.g. "0.0.0.0:7443" or "[::]:7443".
    pub tcp: Option<String>,
    /// The server's certificate chain (PEM), leaf first.
    pub tls_cert: Option<PathBuf>,
    /// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// The CA certificates (PEM) client certificates must chain to.
    pub client_ca: Option<PathBuf>,
}

/// Permission bits of a socket file, written as octal digits or as an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Number(u32),
            Octal(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Number(mode) => Ok(SocketMode(mode)),
            Written::Octal(text) => u32::from_str_radix(text.trim_start_matches("0o"), 8)
                .map(SocketMode)
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "mode {text:?} is not octal digits such as \"0660\""
                    ))
                }),
        }
    }
}

/// A listener, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listener {
    Unix(UnixListen),
    Tls(TlsListen),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixListen {
    /// How the config names it in messages (`listen[0]`, or `socket`).
    pub name: String,
    pub path: PathBuf,
    pub mode: u32,
    pub gid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListen {
    /// How the config names it in messages (`listen[1]`).
    pub name: String,
    pub address: std::net::SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl Listener {
    pub fn name(&self) -> &str {
        match self {
            Listener::Unix(unix) => &unix.name,
            Listener::Tls(tls) => &tls.name,
        }
    }

    pub(super) fn same_place(&self, other: &Listener) -> bool {
        match (self, other) {
            (Listener::Unix(a), Listener::Unix(b)) => a.path == b.path,
            (Listener::Tls(a), Listener::Tls(b)) => a.address == b.address,
            _ => false,
        }
    }
}

impl Listen {
    /// A Unix listener entry for `path` (what `--socket` adds to `[[listen]]`).
    pub fn unix(path: PathBuf, socket_gid: Option<u32>) -> Self {
        Self {
            unix: Some(path),
            socket_gid,
            ..Self::default()
        }
    }

    pub(super) fn validate(&self, name: &str) -> Result<Listener> {
        let key = |k: &str| format!("{name}.{k}");
        let absolute = |k: &str, path: &Option<PathBuf>| -> Result<PathBuf> {
            match path {
                None => Err(RunnerError::invalid(
                    key(k),
                    "is required for a tcp listener (TLS with client certificates; there is no plaintext TCP)",
                )),
                Some(path) if !path.is_absolute() => {
                    Err(RunnerError::invalid(key(k), "must be an absolute path"))
                }
                Some(path) => Ok(path.clone()),
            }
        };
        match (&self.unix, &self.tcp) {
            (Some(_), Some(_)) => Err(RunnerError::invalid(
                name,
                "has both `unix` and `tcp`: one listener per entry",
            )),
            (None, None) => Err(RunnerError::invalid(
                name,
                "needs `unix = PATH` or `tcp = \"ADDR:PORT\"`",
            )),
            (Some(path), None) => {
                for (k, given) in [
                    ("tls_cert", self.tls_cert.is_some()),
                    ("tls_key", self.tls_key.is_some()),
                    ("client_ca", self.client_ca.is_some()),
                ] {
                    if given {
                        return Err(RunnerError::invalid(key(k), "is for tcp listeners only"));
                    }
                }
                if !path.is_absolute() {
                    return Err(RunnerError::invalid(
                        key("unix"),
                        "must be an absolute path",
                    ));
                }
                let mode = self.mode.map_or(DEFAULT_SOCKET_MODE, |m| m.0);
                if mode > 0o777 {
                    return Err(RunnerError::invalid(
                        key("mode"),
                        "must be permission bits, at most 0777",
                    ));
                }
                Ok(Listener::Unix(UnixListen {
                    name: name.to_string(),
                    path: path.clone(),
                    mode,
                    gid: self.socket_gid,
                }))
            }
            (None, Some(address)) => {
                if self.mode.is_some() {
                    return Err(RunnerError::invalid(
                        key("mode"),
                        "is for unix listeners only",
                    ));
                }
                if self.socket_gid.is_some() {
                    return Err(RunnerError::invalid(
                        key("socket_gid"),
                        "is for unix listeners only",
                    ));
                }
                let address = address.parse().map_err(|_| {
                    RunnerError::invalid(
                        key("tcp"),
                        format!("{address:?} is not ADDR:PORT with a literal address (e.g. \"0.0.0.0:7443\", \"[::]:7443\")"),
                    )
                })?;
                Ok(Listener::Tls(TlsListen {
                    name: name.to_string(),
                    address,
                    cert: absolute("tls_cert", &self.tls_cert)?,
                    key: absolute("tls_key", &self.tls_key)?,
                    client_ca: absolute("client_ca", &self.client_ca)?,
                }))
            }
        }
    }
}
