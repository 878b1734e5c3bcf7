//! Registry credentials from a docker-style config.json.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::error::{Result, RunnerError};

/// The largest docker-style config.json read for credentials.
const MAX_AUTH_FILE_BYTES: u64 = 1 << 20;

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// The registry a docker config.json key names: `https://HOST[:PORT]/v1/` -> `HOST[:PORT]`.
fn auth_key_registry(key: &str) -> &str {
    let key = key.split_once("://").map_or(key, |(_, rest)| rest);
    key.split('/').next().unwrap_or(key)
}

fn same_registry(a: &str, b: &str) -> bool {
    const DOCKER_HUB: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];
    a.eq_ignore_ascii_case(b)
        || (DOCKER_HUB.iter().any(|h| h.eq_ignore_ascii_case(a))
            && DOCKER_HUB.iter().any(|h| h.eq_ignore_ascii_case(b)))
}

/// The credentials for `registry` from a docker-style config.json (`auths.REGISTRY.auth`,
/// base64 `user:password`, or `username` and `password`). Messages never hold them.
pub fn registry_auth(file: Option<&Path>, registry: &str) -> Result<RegistryAuth> {
    let path = match file {
        Some(path) => path.to_path_buf(),
        None => {
            let default = std::env::var_os("DOCKER_CONFIG")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
                .map(|dir| dir.join("config.json"));
            match default {
                Some(path) if path.is_file() => path,
                _ => return Ok(RegistryAuth::Anonymous),
            }
        }
    };
    let mut bytes = Vec::new();
    fs::File::open(&path)
        .and_then(|f| f.take(MAX_AUTH_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(RunnerError::io_path("reading", &path))?;
    let unreadable = |why: &str| {
        RunnerError::FailedPrecondition(format!("registry credentials {}: {why}", path.display()))
    };
    if bytes.len() as u64 > MAX_AUTH_FILE_BYTES {
        return Err(unreadable("larger than 1 MiB"));
    }
    // serde_json's errors quote no input, only positions.
    let config: DockerConfig =
        serde_json::from_slice(&bytes).map_err(|e| unreadable(&e.to_string()))?;
    let Some(entry) = config
        .auths
        .iter()
        .find(|(key, _)| same_registry(auth_key_registry(key), registry))
        .map(|(_, entry)| entry)
    else {
        return Ok(RegistryAuth::Anonymous);
    };
    let bad_entry = || unreadable(&format!("auths entry for {registry} is not user:password"));
    match (&entry.auth, &entry.username, &entry.password) {
        (Some(auth), _, _) if !auth.is_empty() => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad_entry())?;
            let decoded = String::from_utf8(decoded).map_err(|_| bad_entry())?;
            let (user, password) = decoded.split_once(':').ok_or_else(bad_entry)?;
            Ok(RegistryAuth::Basic(user.to_string(), password.to_string()))
        }
        (_, Some(user), Some(password)) => Ok(RegistryAuth::Basic(user.clone(), password.clone())),
        _ => Ok(RegistryAuth::Anonymous),
    }
}
