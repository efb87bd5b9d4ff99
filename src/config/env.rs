//! The `KNOXGATE_*` environment overlay: each variable replaces one key of the file before the
//! file is parsed, typed like that key's default.

use std::{collections::BTreeMap, ffi::OsString};

use super::{ConfigError, FileConfig, value::invalid};

/// Variables that belong to the CLI rather than to a config key.
const CLI_ENV: &[&str] = &["KNOXGATE_CONFIG"];

/// Kubernetes injects `<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT`, `<SERVICE>_PORT_8080_TCP…` for
/// every Service in the namespace; a Service named `knoxgate` must not stop the pod.
fn is_service_link(var: &str) -> bool {
    var == "KNOXGATE_PORT"
        || var.starts_with("KNOXGATE_SERVICE_")
        || var.starts_with("KNOXGATE_PORT_")
}

/// Whether `var` is none of the config's business: not a `KNOXGATE_*` name, or one the CLI or
/// Kubernetes owns.
pub(super) fn is_ignored(var: &str) -> bool {
    !var.starts_with("KNOXGATE_") || CLI_ENV.contains(&var) || is_service_link(var)
}

/// The process environment as [`apply`] takes it. Variables that are not knoxgate's are dropped
/// unread, whatever bytes they hold (`std::env::vars` panics at the first value that is not
/// UTF-8, even an unrelated one); a `KNOXGATE_*` variable that is not UTF-8 is an error naming it.
pub(super) fn utf8_vars(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (name, value) in vars {
        // Lossy only to decide: a name that starts with `KNOXGATE_` keeps that prefix.
        if is_ignored(&name.to_string_lossy()) {
            continue;
        }
        let name = name.into_string().map_err(|name| {
            invalid(
                &name.to_string_lossy(),
                "environment variable name is not valid UTF-8",
            )
        })?;
        let value = value
            .into_string()
            .map_err(|_| invalid(&name, "environment variable value is not valid UTF-8"))?;
        out.push((name, value));
    }
    Ok(out)
}

/// Maps `KNOXGATE_*` variables onto the TOML table, typed like the key's default.
pub(super) fn apply(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(FileConfig::default()).expect("defaults serialise");
    // KNOXGATE_<SECTION>_<KEY> (or KNOXGATE_<KEY> for [server]) → (section, key).
    let mut names = BTreeMap::new();
    for (section, keys) in &defaults {
        for key in keys.as_table().expect("sections are tables").keys() {
            let var = if section == "server" {
                format!("KNOXGATE_{}", key.to_uppercase())
            } else {
                format!("KNOXGATE_{}_{}", section.to_uppercase(), key.to_uppercase())
            };
            names.insert(var, (section.clone(), key.clone()));
        }
    }
    for (var, value) in env {
        if is_ignored(&var) {
            continue;
        }
        let Some((section, key)) = names.get(&var) else {
            return Err(ConfigError::UnknownEnv(var));
        };
        let typed = match &defaults[section][key] {
            toml::Value::Integer(_) => toml::Value::Integer(
                value
                    .trim()
                    .parse()
                    .map_err(|_| invalid(&var, "expects a whole number"))?,
            ),
            toml::Value::Boolean(_) => toml::Value::Boolean(match value.trim() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => return Err(invalid(&var, "expects true or false")),
            }),
            toml::Value::Array(_) => toml::Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_owned()))
                    .collect(),
            ),
            _ => toml::Value::String(value),
        };
        let section_table = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        let toml::Value::Table(section_table) = section_table else {
            return Err(invalid(section, "must be a table"));
        };
        section_table.insert(key.clone(), typed);
    }
    Ok(())
}
