use std::path::PathBuf;

/// Errors of the provenance library (verification has its own [`crate::verify::VerifyError`]).
#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    /// A value canonical JSON cannot encode (floats).
    #[error("canonical JSON cannot encode {0}")]
    CanonicalJson(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A fifo, socket or device node in a tree being hashed.
    #[error("{path}: special file ({kind}) cannot be recorded as an artifact")]
    SpecialFile { path: PathBuf, kind: &'static str },
    /// A tree that cannot be walked or recorded (see [`crate::walk`]); the
    /// path in it is relative to the tree's root.
    #[error(transparent)]
    Walk(#[from] crate::walk::WalkError),
    /// A symlink that in-toto-style recording will not follow (see
    /// [`crate::hash::hash_tree_as_in_toto`]).
    #[error("{path}: symlink {detail}")]
    Symlink { path: PathBuf, detail: String },
    #[error("{path}: not a directory")]
    NotADirectory { path: PathBuf },
    #[error("key error: {0}")]
    Key(String),
    /// A private key file readable by group or others.
    #[error("{path}: private key file mode {mode:04o} is too permissive (must be 0600 or stricter); fix with `chmod 600 {}`", path.display())]
    KeyFileMode { path: PathBuf, mode: u32 },
    /// A private key file owned by another user than the one loading it.
    #[error("{path}: private key file is owned by uid {uid}, not by this process's effective uid {euid}")]
    KeyFileOwner { path: PathBuf, uid: u32, euid: u32 },
    /// Metadata that is not of the expected shape.
    #[error("invalid metadata: {0}")]
    Format(String),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl ProvenanceError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ProvenanceError::Io {
            path: path.into(),
            source,
        }
    }
}
