//! The digest of a step's sandbox profile, which every link records, memoized: building
//! the profile's JSON costs about 0.4 ms, on the path from scheduling a step to its
//! execve, and the steps of one daemon mostly share a few profiles.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use sandbox::{HostSupport, StepSpec};
use sha2::{Digest, Sha256};

use crate::error::{Result, RunnerError};

/// Distinct profiles kept; beyond, the memo starts again (a bound, not an LRU).
const MAX_ENTRIES: usize = 1024;

#[derive(Default)]
pub struct ProfileDigests {
    memo: Mutex<HashMap<Vec<u8>, String>>,
}

impl ProfileDigests {
    /// SHA-256 (hex) of the canonical JSON of `sandbox::profile(spec, host)`. `host` must
    /// be the same for every call (the daemon's, probed once).
    pub fn digest(&self, spec: &StepSpec, host: &HostSupport) -> Result<String> {
        let key = memo_key(spec)?;
        if let Some(hit) = self.memo.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(hit);
        }
        let profile = sandbox::profile(spec, host);
        let digest = hex::encode(Sha256::digest(provenance::cjson::to_canonical(&profile)?));
        if let Ok(mut memo) = self.memo.lock() {
            if memo.len() >= MAX_ENTRIES {
                memo.clear();
            }
            memo.insert(key, digest.clone());
        }
        Ok(digest)
    }
}

/// Everything of the spec the profile may depend on: the spec without argv, environment,
/// the workspace's host path and the working directory below it, which `sandbox::profile` leaves out (tested below).
fn memo_key(spec: &StepSpec) -> Result<Vec<u8>> {
    let mut isolation = spec.clone();
    isolation.argv.clear();
    isolation.env.clear();
    isolation.workspace = PathBuf::new();
    isolation.working_directory.clear();
    serde_json::to_vec(&isolation)
        .map_err(|e| RunnerError::Internal(format!("encoding the step spec: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn host() -> HostSupport {
        HostSupport {
            landlock_abi: 6,
            namespaces: vec!["user".into()],
            seccomp_actions: vec![],
            kernel_release: "test".into(),
            seccomp_policy_sha256: "00".into(),
            waived_layers: vec![],
            cgroup: Default::default(),
        }
    }

    fn spec() -> StepSpec {
        StepSpec {
            argv: vec!["true".into()],
            env: vec![("A".into(), "1".into())],
            root: vec![],
            workspace: "/w/1".into(),
            working_directory: Vec::new(),
            host_uid_base: 300_000,
            id_range: 65536,
            step_uid: 1000,
            timeout_ms: 1000,
            hostname: "kiln".into(),
            tmp_size_bytes: 1 << 20,
            tcp_connect_ports: vec![],
            egress_proxy_port: None,
            waived_layers: vec![],
            limits: Default::default(),
        }
    }

    #[test]
    fn the_memo_key_leaves_out_only_what_the_profile_leaves_out() {
        let host = host();
        let a = spec();
        let mut b = spec();
        b.argv = vec!["other".into()];
        b.env.clear();
        b.workspace = "/w/2".into();
        // What the key leaves out does not change the profile ...
        assert_eq!(sandbox::profile(&a, &host), sandbox::profile(&b, &host));
        // ... and whatever changes the profile changes the key and the digest.
        let digests = ProfileDigests::default();
        let first = digests.digest(&a, &host).unwrap();
        assert_eq!(digests.digest(&b, &host).unwrap(), first);
        let mut c = spec();
        c.limits.memory_bytes += 1;
        let mut d = spec();
        d.egress_proxy_port = Some(3128);
        d.tcp_connect_ports = vec![3128];
        for changed in [c, d] {
            assert_ne!(
                sandbox::profile(&changed, &host),
                sandbox::profile(&a, &host)
            );
            assert_ne!(digests.digest(&changed, &host).unwrap(), first);
        }
    }
}
