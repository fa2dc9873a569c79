//! Pure policy engine: YAML `ContainerPolicy` documents → validated model → kernel map entries.
//!
//! Public API:
//! - [`parse_str`]`(text, file_name) -> Result<Vec<Policy>, PolicyError>`: every document of a
//!   multi-document text; any error rejects them all (and every policy is test-compiled).
//! - [`load_file`]`(path)`, [`load_dir`]`(dir) -> (Vec<Policy>, Vec<PolicyError>)`: per file; a
//!   bad file is reported and the good ones load; duplicate names across files are errors.
//! - [`compile`]`(&Policy) -> Result<CompiledPolicy, PolicyError>`: trie entries for exec, files
//!   and egress, rendered for a ruleset with `keys(ruleset)`, and the userspace evaluators
//!   [`CompiledPolicy::check_exec`], [`CompiledPolicy::check_file`],
//!   [`CompiledPolicy::check_connect`] that give the kernel's verdict.
//! - [`Policy::matches`]`(&ContainerMeta)`: selector matching.
//! - [`Policy::to_yaml`]: a document that `parse_str` reads back to the same policy.
//!
//! The format and its semantics are described in `docs/policy.md`.
mod compile;
mod error;
mod model;
mod net;
mod parse;
mod paths;
mod select;
mod yaml;

#[cfg(test)]
mod tests_compile;
#[cfg(test)]
mod tests_load;
#[cfg(test)]
mod tests_parse;

use std::collections::HashMap;
use std::path::Path;

pub use compile::{CompiledPolicy, Decision, compile};
pub use error::{ErrorKind, PolicyError, Pos};
pub use model::*;
pub use net::{NetPattern, NetTable, key_addr, ports_allow};
pub use paths::{PathPattern, PathTable};
pub use select::glob_match;

/// Parse and validate every document in `text`. `file_name` is only used in errors and in
/// [`Policy::source`].
pub fn parse_str(text: &str, file_name: &str) -> Result<Vec<Policy>, PolicyError> {
    let docs = yaml::parse_stream(text)
        .map_err(|e| PolicyError::new(ErrorKind::Syntax, file_name, e.pos, "", e.message))?;
    let ctx = parse::Ctx { file: file_name };
    let mut out: Vec<Policy> = Vec::with_capacity(docs.len());
    for doc in &docs {
        let p = ctx.policy(doc)?;
        compile(&p)?;
        if let Some(first) = out.iter().find(|q| q.name == p.name) {
            return Err(duplicate(&p, first));
        }
        out.push(p);
    }
    Ok(out)
}

fn duplicate(p: &Policy, first: &Policy) -> PolicyError {
    PolicyError::new(
        ErrorKind::Duplicate,
        &p.source.file,
        p.name_pos,
        "metadata.name",
        format!(
            "duplicate policy name {:?} (first defined at {}:{}:{})",
            p.name, first.source.file, first.name_pos.line, first.name_pos.column
        ),
    )
}

/// Read and parse one file.
pub fn load_file(path: impl AsRef<Path>) -> Result<Vec<Policy>, PolicyError> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| PolicyError::new(ErrorKind::Io, &name, Pos::default(), "", e.to_string()))?;
    parse_str(&text, &name)
}

/// Load every `*.yaml` / `*.yml` file of `dir` (not recursive), in file-name order. A file with
/// an error, or defining a name an earlier file already defined, is skipped as a whole and
/// reported; the other files load.
pub fn load_dir(dir: impl AsRef<Path>) -> (Vec<Policy>, Vec<PolicyError>) {
    let dir = dir.as_ref();
    let mut errors = Vec::new();
    let mut files: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect(),
        Err(e) => {
            let name = dir.display().to_string();
            errors.push(PolicyError::new(
                ErrorKind::Io,
                name,
                Pos::default(),
                "",
                e.to_string(),
            ));
            return (Vec::new(), errors);
        }
    };
    files.sort();
    let mut policies: Vec<Policy> = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for f in files {
        match load_file(&f) {
            Err(e) => errors.push(e),
            Ok(ps) => {
                if let Some(p) = ps.iter().find(|p| names.contains_key(&p.name)) {
                    errors.push(duplicate(p, &policies[names[&p.name]]));
                    continue;
                }
                for p in ps {
                    names.insert(p.name.clone(), policies.len());
                    policies.push(p);
                }
            }
        }
    }
    (policies, errors)
}
