//! The agent library's error type. Each message says what was expected, what was found, and
//! where (path, field, map name), because it ends up in front of an operator or in CNI output.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup v2 mount found in /proc/self/mountinfo; meshlane needs cgroup v2")]
    NoCgroup2,
    #[error("cgroup {path} is not inside the cgroup v2 mount {mount}")]
    CgroupOutsideMount { path: PathBuf, mount: PathBuf },
    #[error(
        "pinned map {path} does not match this agent: expected {expected}, found {found}; \
         remove it with `meshlane uninstall` (this drops accelerated connections' queued data) \
         or start with another --bpffs directory"
    )]
    PinMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error(
        "the programs pinned under {bpffs} are attached to cgroup {pinned}, not {requested}; \
         run `meshlane uninstall` first or use another --bpffs directory"
    )]
    CgroupMismatch {
        bpffs: PathBuf,
        pinned: PathBuf,
        requested: PathBuf,
    },
    #[error("loading the kernel programs: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("kernel program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// The request is malformed or a value is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The request names something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request clashes with what exists.
    #[error("{0}")]
    Conflict(String),
    /// The agent cannot do this now.
    #[error("{0}")]
    Unavailable(String),
    /// Something in the agent itself went wrong (not the caller's input).
    #[error("{0}")]
    Internal(String),
    #[error("state file {path}: {msg}")]
    State { path: PathBuf, msg: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The refusal kind an API caller sees: only input problems are the caller's fault.
    pub fn kind(&self) -> meshlane_api::ErrorKind {
        use meshlane_api::ErrorKind as K;
        match self {
            Error::Invalid(_) => K::InvalidInput,
            Error::NotFound(_) => K::NotFound,
            Error::Conflict(_) => K::Conflict,
            Error::Unavailable(_) => K::Unavailable,
            _ => K::Internal,
        }
    }

    /// The error as the API's refusal.
    pub fn refusal(&self) -> meshlane_api::Refusal {
        meshlane_api::Refusal::new(self.kind(), self.to_string())
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
