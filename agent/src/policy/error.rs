//! Policy errors: every one points at a file, a line, a column and the field it is about.
use std::fmt;

/// A position in a policy file (1-based line and column; 0 = unknown).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

impl Pos {
    pub const fn new(line: u32, column: u32) -> Self {
        Self { line, column }
    }
}

/// Broad class of an error, for callers that react differently (e.g. the API maps them to codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file could not be read.
    Io,
    /// Not well-formed YAML.
    Syntax,
    /// A required field is missing.
    Missing,
    /// A field that the format does not have.
    Unknown,
    /// A value of the wrong type or out of range.
    Invalid,
    /// A policy name used twice.
    Duplicate,
    /// A limit of the kernel maps is exceeded.
    Limit,
}

/// A validation or compilation error. Displays as `file:line:col: field: reason`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub kind: ErrorKind,
    pub file: String,
    pub pos: Pos,
    /// Dotted field path such as `spec.files[1].path` (empty when not about one field).
    pub field: String,
    pub reason: String,
}

impl PolicyError {
    pub fn new(
        kind: ErrorKind,
        file: impl Into<String>,
        pos: Pos,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            file: file.into(),
            pos,
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn line(&self) -> u32 {
        self.pos.line
    }

    pub fn column(&self) -> u32 {
        self.pos.column
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.pos.line > 0 {
            write!(f, ":{}:{}", self.pos.line, self.pos.column)?;
        }
        write!(f, ": ")?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.reason)
    }
}
