//! Secrets by reference: `{name}_env` / `{name}_file` fields and the inline
//! `{ env = ... }` / `{ file = ... }` form, read once at load. Errors name the
//! field and the variable or path, never the value.

use std::path::PathBuf;

use crate::token::Secret;

use super::ConfigError;
use super::sources::RawRef;

/// Reads a secret given by reference: `{name}_env` (an environment variable)
/// or `{name}_file` (a file; surrounding whitespace is trimmed). Read once,
/// at load. Errors name the field and the variable or path, never the value.
pub(super) fn secret_ref(
    prefix: &str,
    name: &str,
    env: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<Secret>, ConfigError> {
    read_secret(prefix, name, "_", env, file)
}

/// Like [`secret_ref`] for the `{ env = "..." }` / `{ file = "..." }` form,
/// whose fields are `name.env` and `name.file`.
pub(super) fn inline_secret_ref(field: &str, r: RawRef) -> Result<Secret, ConfigError> {
    let (prefix, name) = field.rsplit_once('.').unwrap_or(("", field));
    read_secret(prefix, name, ".", r.env, r.file)?.ok_or_else(|| {
        ConfigError::new(
            field,
            "give a string, or { env = \"VAR\" } or { file = \"/path\" }",
        )
    })
}

pub(super) fn read_secret(
    prefix: &str,
    name: &str,
    sep: &str,
    env: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<Secret>, ConfigError> {
    let field = |suffix: &str| format!("{prefix}.{name}{sep}{suffix}");
    let value = match (env, file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                field("env"),
                format!("set only one of {name}{sep}env and {name}{sep}file"),
            ));
        }
        (None, None) => return Ok(None),
        (Some(var), None) => std::env::var(&var).map_err(|e| {
            ConfigError::new(
                field("env"),
                match e {
                    std::env::VarError::NotPresent => {
                        format!("environment variable {var} is not set")
                    }
                    std::env::VarError::NotUnicode(_) => {
                        format!("environment variable {var} is not valid UTF-8")
                    }
                },
            )
        })?,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|e| {
                ConfigError::new(
                    field("file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?
            .trim()
            .to_owned(),
    };
    if value.trim().is_empty() {
        return Err(ConfigError::new(
            format!("{prefix}.{name}"),
            "the referenced secret is empty",
        ));
    }
    Ok(Some(Secret::new(value)))
}

pub(super) fn required_secret(
    prefix: &str,
    name: &str,
    env: Option<String>,
    file: Option<PathBuf>,
) -> Result<Secret, ConfigError> {
    secret_ref(prefix, name, env, file)?.ok_or_else(|| {
        ConfigError::new(
            format!("{prefix}.{name}_env"),
            format!(
                "missing; give the {name} by reference: {name}_env (an environment variable) or {name}_file (a file)"
            ),
        )
    })
}
