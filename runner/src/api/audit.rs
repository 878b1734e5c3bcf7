//! The API's side of the audit log: each audited call and every refusal of the
//! authenticator are appended, durably, before the caller is answered.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::api::auth::Principal;
use crate::error::{Result, RunnerError};
use crate::store::audit::{AuditLog, Decision, Record};

/// The audit record of a call by `caller` that ended in `result`. What the caller may not
/// see (NOT_FOUND, answered alike for what does not exist) and PERMISSION_DENIED are
/// denials; other failures were allowed and say why they failed.
pub fn call_record<T>(
    caller: &Principal,
    action: &str,
    object: String,
    result: &Result<T>,
) -> Record {
    let (decision, reason) = match result {
        Ok(_) => (Decision::Allow, String::new()),
        Err(err @ (RunnerError::NotFound(_) | RunnerError::PermissionDenied(_))) => {
            (Decision::Deny, err.to_string())
        }
        Err(err) => (Decision::Allow, format!("failed: {err}")),
    };
    Record {
        principal: caller.name(),
        tenant: caller.tenant.clone(),
        action: action.into(),
        object,
        decision,
        reason,
    }
}

/// Appends the record of a call and answers its result; a record that cannot be written
/// fails the call (RESOURCE_EXHAUSTED) instead. Called on the blocking boundary.
pub fn audited<T>(
    audit: &AuditLog,
    caller: &Principal,
    action: &str,
    object: String,
    result: Result<T>,
) -> Result<T> {
    audit.append(call_record(caller, action, object, &result))?;
    result
}

/// Like [`audited`], for reads of records: only refusals are recorded (a client polling
/// its own job would fill the log with nothing to review).
pub fn audited_denial<T>(
    audit: &AuditLog,
    caller: &Principal,
    action: &str,
    object: String,
    result: Result<T>,
) -> Result<T> {
    if result.is_err() {
        return audited(audit, caller, action, object, result);
    }
    result
}

/// An authenticator whose every refusal (UNAUTHENTICATED, PERMISSION_DENIED) is recorded
/// as a denial of the peer it refused.
#[derive(Clone)]
pub struct AuditedAuthenticator<A> {
    inner: A,
    audit: Arc<AuditLog>,
}

impl<A> AuditedAuthenticator<A> {
    pub fn new(inner: A, audit: Arc<AuditLog>) -> Self {
        Self { inner, audit }
    }
}

impl<A: tonic::service::Interceptor> tonic::service::Interceptor for AuditedAuthenticator<A> {
    fn call(&mut self, request: Request<()>) -> std::result::Result<Request<()>, Status> {
        let peer = peer_name(&request);
        self.inner.call(request).inspect_err(|status| {
            let record = Record {
                principal: peer,
                tenant: None,
                action: "authenticate".into(),
                object: "-".into(),
                decision: Decision::Deny,
                reason: format!("{:?}: {}", status.code(), status.message()),
            };
            // The interceptor is synchronous: the append (an fsync) leaves the runtime's
            // worker to the others while it waits.
            let append = || self.audit.append(record);
            let appended = match tokio::runtime::Handle::try_current() {
                Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                    tokio::task::block_in_place(append)
                }
                _ => append(),
            };
            if let Err(err) = appended {
                tracing::error!(error = %err, "could not audit a refused caller");
            }
        })
    }
}

/// Who a refused request came from, as far as the transport tells.
fn peer_name<T>(request: &Request<T>) -> String {
    if let Some(uid) = request
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| cred.uid())
    {
        return crate::api::auth::unix_owner(uid);
    }
    match request.remote_addr() {
        Some(addr) => format!("tcp:{addr}"),
        None => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn not_found_for_others_is_a_denial_and_other_failures_are_not() {
        let caller = Principal::unix(1000, &[]);
        let denied: Result<()> = Err(RunnerError::NotFound("job x".into()));
        let record = call_record(&caller, "job.get", "job:x".into(), &denied);
        assert_eq!(record.decision, Decision::Deny);
        assert_eq!(record.principal, "uid:1000");
        assert!(record.reason.contains("job x not found"));
        let failed: Result<()> = Err(RunnerError::Unavailable("shutting down".into()));
        let record = call_record(&caller, "job.submit", "job".into(), &failed);
        assert_eq!(record.decision, Decision::Allow);
        assert!(record.reason.starts_with("failed: "));
        let ok: Result<()> = Ok(());
        assert_eq!(
            call_record(&caller, "x", "y".into(), &ok).decision,
            Decision::Allow
        );
    }

    #[test]
    fn every_refusal_of_the_authenticator_is_recorded() {
        use tonic::service::Interceptor;
        let dir = tempfile::tempdir().unwrap();
        let (signer, _) = crate::engine::signer::Signer::open(&dir.path().join("keys")).unwrap();
        let audit = Arc::new(
            AuditLog::open(dir.path(), signer, 100, std::time::Duration::from_secs(60)).unwrap(),
        );
        let refuse = |_: Request<()>| -> std::result::Result<Request<()>, Status> {
            Err(Status::permission_denied("uid 1234 maps to no tenant"))
        };
        let mut auth = AuditedAuthenticator::new(refuse, audit.clone());
        let err = auth.call(Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let accept = |r: Request<()>| -> std::result::Result<Request<()>, Status> { Ok(r) };
        AuditedAuthenticator::new(accept, audit.clone())
            .call(Request::new(()))
            .unwrap();
        let lines = crate::store::audit::tail(dir.path(), 10).unwrap();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let entry: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(entry["action"], "authenticate");
        assert_eq!(entry["decision"], "deny");
        assert_eq!(entry["principal"], "unknown");
        assert!(entry["reason"]
            .as_str()
            .unwrap()
            .contains("maps to no tenant"));
    }
}
