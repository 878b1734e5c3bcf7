//! Bazel's log of its remote calls (`--experimental_remote_grpc_log=FILE`, named
//! `--remote_grpc_log` in later Bazel releases): which actions a build had executed
//! remotely or took from the remote cache, and the results it received for each.
//!
//! The file is a sequence of `remote_logging.LogEntry` messages, each preceded by its
//! length as a varint (Java's `writeDelimitedTo`). The messages below are the parts of
//! Bazel's `src/main/protobuf/remote_execution_log.proto` this reads, with its field
//! numbers; prost skips the rest. The members of `RpcCallDetails`' oneof are plain
//! optional fields here, which is the same encoding on the wire.

use std::collections::HashMap;
use std::io::Read;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ActionResult, Digest, ExecuteRequest, ExecuteResponse, GetActionResultRequest,
    WaitExecutionRequest,
};
use bazel_remote_apis::google::longrunning::{operation, Operation};
use bazel_remote_apis::google::rpc::Status;
use prost::Message;

/// The largest log entry read (an entry holds one call's request and responses). Decoded,
/// an entry of tiny repeated messages takes many times its size: kept well below what
/// a verifier's memory holds.
const MAX_ENTRY_BYTES: u64 = 16 << 20;
/// The type URL of an ExecuteResponse in an Operation's response.
const EXECUTE_RESPONSE_TYPE_URL: &str =
    "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse";
/// gRPC's NOT_FOUND: a cache lookup that missed.
const NOT_FOUND: i32 = 5;

#[derive(Clone, PartialEq, Message)]
struct LogEntry {
    #[prost(message, optional, tag = "2")]
    status: Option<Status>,
    #[prost(string, tag = "3")]
    method_name: String,
    #[prost(message, optional, tag = "4")]
    details: Option<RpcCallDetails>,
}

#[derive(Clone, PartialEq, Message)]
struct RpcCallDetails {
    #[prost(message, optional, tag = "7")]
    execute: Option<ExecuteDetails>,
    #[prost(message, optional, tag = "8")]
    get_action_result: Option<GetActionResultDetails>,
    #[prost(message, optional, tag = "9")]
    wait_execution: Option<WaitExecutionDetails>,
}

#[derive(Clone, PartialEq, Message)]
struct ExecuteDetails {
    #[prost(message, optional, tag = "1")]
    request: Option<ExecuteRequest>,
    #[prost(message, repeated, tag = "2")]
    responses: Vec<Operation>,
}

#[derive(Clone, PartialEq, Message)]
struct GetActionResultDetails {
    #[prost(message, optional, tag = "1")]
    request: Option<GetActionResultRequest>,
    #[prost(message, optional, tag = "2")]
    response: Option<ActionResult>,
}

#[derive(Clone, PartialEq, Message)]
struct WaitExecutionDetails {
    #[prost(message, optional, tag = "1")]
    request: Option<WaitExecutionRequest>,
    #[prost(message, repeated, tag = "2")]
    responses: Vec<Operation>,
}

/// How Bazel came by an action's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// An Execute (or WaitExecution) call answered it.
    Executed,
    /// A GetActionResult call found it in the action cache.
    CacheHit,
}

impl Source {
    /// Its name in `kiln verify --json`'s output.
    pub fn name(self) -> &'static str {
        match self {
            Source::Executed => "executed",
            Source::CacheHit => "cache-hit",
        }
    }
}

/// One action of the build as the log records it.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteAction {
    pub digest: Digest,
    /// The result Bazel received last for it, and how; None when no call answered one
    /// (the action failed remotely, or Bazel looked it up, missed, and ran it elsewhere).
    pub received: Option<(Source, ActionResult)>,
    /// The results Bazel received for it before the last, oldest first: each was taken
    /// into the build as well, so each is judged too.
    pub earlier: Vec<(Source, ActionResult)>,
    /// Why there is no result, when there is none.
    pub missing_because: Option<String>,
}

/// Errors reading a log.
#[derive(Debug, thiserror::Error)]
pub enum GrpcLogError {
    #[error("reading the log: {0}")]
    Io(#[from] std::io::Error),
    #[error("entry {index}: its length prefix is not a varint")]
    BadLength { index: usize },
    #[error("entry {index}: {length} bytes, more than the {MAX_ENTRY_BYTES} an entry may have")]
    TooLarge { index: usize, length: u64 },
    #[error("entry {index}: the log ends inside it")]
    Truncated { index: usize },
    #[error("entry {index} is not a remote_logging.LogEntry: {source}")]
    Decode {
        index: usize,
        source: prost::DecodeError,
    },
}

/// The actions a log names, in the order Bazel first called about them.
pub fn remote_actions(reader: impl Read) -> Result<Vec<RemoteAction>, GrpcLogError> {
    let mut reader = std::io::BufReader::new(reader);
    let mut actions: Vec<RemoteAction> = Vec::new();
    let mut index_of: HashMap<(String, i64), usize> = HashMap::new();
    // Operation names Execute answered with, for WaitExecution calls that name only those.
    let mut operation_action: HashMap<String, usize> = HashMap::new();
    let mut entry_index = 0;
    while let Some(entry) = next_entry(&mut reader, entry_index)? {
        entry_index += 1;
        let Some(details) = entry.details else {
            continue;
        };
        let mut slot = |digest: &Digest| {
            let key = (digest.hash.clone(), digest.size_bytes);
            *index_of.entry(key).or_insert_with(|| {
                actions.push(RemoteAction {
                    digest: digest.clone(),
                    received: None,
                    earlier: Vec::new(),
                    missing_because: None,
                });
                actions.len() - 1
            })
        };
        if let Some(execute) = details.execute {
            let Some(digest) = execute.request.and_then(|r| r.action_digest) else {
                continue;
            };
            let at = slot(&digest);
            for operation in &execute.responses {
                if !operation.name.is_empty() {
                    operation_action.insert(operation.name.clone(), at);
                }
            }
            settle(&mut actions[at], &execute.responses, entry.status.as_ref());
        } else if let Some(wait) = details.wait_execution {
            let at = wait
                .request
                .as_ref()
                .and_then(|r| operation_action.get(&r.name).copied());
            if let Some(at) = at {
                settle(&mut actions[at], &wait.responses, entry.status.as_ref());
            }
        } else if let Some(lookup) = details.get_action_result {
            let Some(digest) = lookup.request.and_then(|r| r.action_digest) else {
                continue;
            };
            let at = slot(&digest);
            let code = entry.status.as_ref().map_or(0, |s| s.code);
            let action = &mut actions[at];
            match (code, lookup.response) {
                (0, Some(result)) => action.receive(Source::CacheHit, result),
                (NOT_FOUND, _) if action.received.is_none() => {
                    action.missing_because = Some(
                        "not in the remote cache, and no remote execution of it answered: \
                         Bazel ran it elsewhere"
                            .to_string(),
                    );
                }
                _ => {}
            }
        }
    }
    Ok(actions)
}

impl RemoteAction {
    /// Records a result Bazel received; one received before is kept, to be judged too.
    fn receive(&mut self, source: Source, result: ActionResult) {
        if let Some(before) = self.received.replace((source, result)) {
            self.earlier.push(before);
        }
        self.missing_because = None;
    }
}

/// Records the result an Execute or WaitExecution stream ended with, or why it has none.
fn settle(action: &mut RemoteAction, responses: &[Operation], status: Option<&Status>) {
    let last = responses.iter().rev().find(|op| op.done);
    let response = last.and_then(|op| match &op.result {
        Some(operation::Result::Response(any)) if any.type_url == EXECUTE_RESPONSE_TYPE_URL => {
            ExecuteResponse::decode(any.value.as_slice()).ok()
        }
        _ => None,
    });
    match response {
        Some(ExecuteResponse {
            result: Some(result),
            status,
            ..
        }) if status.as_ref().is_none_or(|s| s.code == 0) => {
            action.receive(Source::Executed, result);
        }
        Some(response) if action.received.is_none() => {
            let status = response.status.unwrap_or_default();
            action.missing_because = Some(format!(
                "its remote execution failed: code {} {}",
                status.code, status.message
            ));
        }
        None if action.received.is_none() => {
            let why = match status.filter(|s| s.code != 0) {
                Some(s) => format!("the call failed: code {} {}", s.code, s.message),
                None => "the call ended without a result".to_string(),
            };
            action.missing_because = Some(format!("no remote execution answered: {why}"));
        }
        _ => {}
    }
}

/// The next length-prefixed entry, or None at the end of the log.
fn next_entry(reader: &mut impl Read, index: usize) -> Result<Option<LogEntry>, GrpcLogError> {
    // A varint is at most 10 bytes, each but the last with its high bit set.
    let mut prefix = Vec::with_capacity(10);
    loop {
        let mut byte = [0u8; 1];
        if reader.read(&mut byte)? == 0 {
            if prefix.is_empty() {
                return Ok(None);
            }
            return Err(GrpcLogError::Truncated { index });
        }
        prefix.push(byte[0]);
        if byte[0] & 0x80 == 0 {
            break;
        }
        if prefix.len() == 10 {
            return Err(GrpcLogError::BadLength { index });
        }
    }
    let length = prost::encoding::decode_varint(&mut prefix.as_slice())
        .map_err(|_| GrpcLogError::BadLength { index })?;
    if length > MAX_ENTRY_BYTES {
        return Err(GrpcLogError::TooLarge { index, length });
    }
    let mut body = Vec::new();
    reader.take(length).read_to_end(&mut body)?;
    if body.len() as u64 != length {
        return Err(GrpcLogError::Truncated { index });
    }
    LogEntry::decode(body.as_slice())
        .map(Some)
        .map_err(|source| GrpcLogError::Decode { index, source })
}

/// Logs as Bazel writes them, for tests of what reads them.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use bazel_remote_apis::google::protobuf::Any;

    /// An Execute call for `action` answered with `result`.
    pub fn executed(action: &Digest, result: ActionResult) -> Vec<u8> {
        let response = ExecuteResponse {
            result: Some(result),
            ..Default::default()
        };
        let entry = LogEntry {
            status: None,
            method_name: "build.bazel.remote.execution.v2.Execution/Execute".to_string(),
            details: Some(RpcCallDetails {
                execute: Some(ExecuteDetails {
                    request: Some(ExecuteRequest {
                        action_digest: Some(action.clone()),
                        ..Default::default()
                    }),
                    responses: vec![Operation {
                        name: "operation".to_string(),
                        done: true,
                        result: Some(operation::Result::Response(Any {
                            type_url: EXECUTE_RESPONSE_TYPE_URL.to_string(),
                            value: response.encode_to_vec(),
                        })),
                        ..Default::default()
                    }],
                }),
                ..Default::default()
            }),
        };
        entry.encode_length_delimited_to_vec()
    }

    /// A GetActionResult call for `action` that found `found`, or missed.
    pub(super) fn lookup(action: &Digest, found: Option<ActionResult>) -> LogEntry {
        LogEntry {
            status: Some(Status {
                code: if found.is_some() { 0 } else { NOT_FOUND },
                ..Default::default()
            }),
            method_name: "build.bazel.remote.execution.v2.ActionCache/GetActionResult".to_string(),
            details: Some(RpcCallDetails {
                get_action_result: Some(GetActionResultDetails {
                    request: Some(GetActionResultRequest {
                        action_digest: Some(action.clone()),
                        ..Default::default()
                    }),
                    response: found,
                }),
                ..Default::default()
            }),
        }
    }

    /// A GetActionResult call for `action` that found `result`.
    pub fn hit(action: &Digest, result: ActionResult) -> Vec<u8> {
        lookup(action, Some(result)).encode_length_delimited_to_vec()
    }

    /// A GetActionResult call for `action` that missed.
    pub fn missed(action: &Digest) -> Vec<u8> {
        lookup(action, None).encode_length_delimited_to_vec()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::fixtures::lookup;
    use super::*;
    use bazel_remote_apis::build::bazel::remote::execution::v2::OutputFile;
    use bazel_remote_apis::google::protobuf::Any;

    fn digest(byte: u8, size: i64) -> Digest {
        Digest {
            hash: hex::encode([byte; 32]),
            size_bytes: size,
        }
    }

    fn result(output: &str) -> ActionResult {
        ActionResult {
            output_files: vec![OutputFile {
                path: output.to_string(),
                digest: Some(digest(9, 3)),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn done(name: &str, response: ExecuteResponse) -> Operation {
        Operation {
            name: name.to_string(),
            done: true,
            result: Some(operation::Result::Response(Any {
                type_url: EXECUTE_RESPONSE_TYPE_URL.to_string(),
                value: response.encode_to_vec(),
            })),
            ..Default::default()
        }
    }

    fn running(name: &str) -> Operation {
        Operation {
            name: name.to_string(),
            ..Default::default()
        }
    }

    fn execute(action: &Digest, responses: Vec<Operation>, status: i32) -> LogEntry {
        LogEntry {
            status: Some(Status {
                code: status,
                ..Default::default()
            }),
            method_name: "build.bazel.remote.execution.v2.Execution/Execute".to_string(),
            details: Some(RpcCallDetails {
                execute: Some(ExecuteDetails {
                    request: Some(ExecuteRequest {
                        action_digest: Some(action.clone()),
                        ..Default::default()
                    }),
                    responses,
                }),
                ..Default::default()
            }),
        }
    }

    fn log(entries: &[LogEntry]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for entry in entries {
            entry.encode_length_delimited(&mut bytes).unwrap();
        }
        bytes
    }

    #[test]
    fn executed_cached_and_missing_actions_are_told_apart() {
        let (a, b, c, d) = (digest(1, 10), digest(2, 20), digest(3, 30), digest(4, 40));
        let ok = |output: &str| ExecuteResponse {
            result: Some(result(output)),
            ..Default::default()
        };
        let bytes = log(&[
            // a: a miss, then executed.
            lookup(&a, None),
            execute(&a, vec![running("op-a"), done("op-a", ok("a.out"))], 0),
            // b: a cache hit.
            lookup(&b, Some(result("b.out"))),
            // c: a miss, and nothing else: run locally.
            lookup(&c, None),
            // d: the Execute stream broke; WaitExecution got the result.
            execute(&d, vec![running("op-d")], 14),
            LogEntry {
                details: Some(RpcCallDetails {
                    wait_execution: Some(WaitExecutionDetails {
                        request: Some(WaitExecutionRequest {
                            name: "op-d".to_string(),
                        }),
                        responses: vec![done("op-d", ok("d.out"))],
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]);
        let actions = remote_actions(bytes.as_slice()).unwrap();
        let digests: Vec<_> = actions.iter().map(|a| a.digest.clone()).collect();
        assert_eq!(digests, vec![a, b, c, d]);
        let outputs: Vec<_> = actions
            .iter()
            .map(|a| {
                a.received
                    .as_ref()
                    .map(|(source, r)| (*source, r.output_files[0].path.clone()))
            })
            .collect();
        assert_eq!(
            outputs,
            vec![
                Some((Source::Executed, "a.out".to_string())),
                Some((Source::CacheHit, "b.out".to_string())),
                None,
                Some((Source::Executed, "d.out".to_string())),
            ]
        );
        assert!(actions[2]
            .missing_because
            .as_deref()
            .unwrap()
            .contains("elsewhere"));
    }

    #[test]
    fn a_failed_execution_has_no_result() {
        let a = digest(1, 10);
        let failed = ExecuteResponse {
            result: Some(result("a.out")),
            status: Some(Status {
                code: 4,
                message: "deadline".to_string(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let actions =
            remote_actions(log(&[execute(&a, vec![done("op", failed)], 0)]).as_slice()).unwrap();
        assert!(actions[0].received.is_none());
        assert!(actions[0]
            .missing_because
            .as_deref()
            .unwrap()
            .contains("deadline"));
    }

    #[test]
    fn a_damaged_log_is_an_error() {
        let a = digest(1, 10);
        let whole = log(&[execute(&a, Vec::new(), 0)]);
        assert!(matches!(
            remote_actions(&whole[..whole.len() - 1]),
            Err(GrpcLogError::Truncated { index: 0 })
        ));
        assert!(matches!(
            remote_actions(&[0xff; 11][..]),
            Err(GrpcLogError::BadLength { index: 0 })
        ));
        // A length far past the limit is refused before anything is read.
        let mut huge = Vec::new();
        prost::encoding::encode_varint(1 << 40, &mut huge);
        assert!(matches!(
            remote_actions(huge.as_slice()),
            Err(GrpcLogError::TooLarge { .. })
        ));
        // Bytes that are no LogEntry.
        assert!(matches!(
            remote_actions(&[3, 0xff, 0xff, 0xff][..]),
            Err(GrpcLogError::Decode { .. })
        ));
        assert!(remote_actions(&[][..]).unwrap().is_empty());
    }
}
