//! Reading the layers into [`Settings`], and explaining a refusal: the dotted key, and the
//! layer (file, variable, override) that set it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{Settings, SettingsError, ENVIRONMENT_VAR, PRODUCTION};

const DEFAULT_TOML: &str = include_str!("../../config/default.toml");
const ENV_PREFIX: &str = "ATLAS_STRIPE";
/// Where the environments' files are looked for, relative to the working directory.
const CONFIG_DIR: &str = "config";
/// The origin `config` gives values read from variables.
const FROM_VARIABLES: &str = "the environment";

/// Where the layers come from. [`Settings::load`] reads the process; tests name them.
pub(super) struct Layers {
    /// `ATLAS_STRIPE_ENVIRONMENT`.
    pub(super) environment: Option<String>,
    /// Where `$environment.toml` is.
    pub(super) config_dir: PathBuf,
    /// `--config`.
    pub(super) file: Option<PathBuf>,
    /// The variables; `None` reads the process environment.
    pub(super) vars: Option<HashMap<String, String>>,
}

impl Settings {
    /// Loads the layers: `config/default.toml` (embedded), `config/$ATLAS_STRIPE_ENVIRONMENT.toml`
    /// when that variable is set, `file` (`--config`), `ATLAS_STRIPE__…` variables, then the
    /// `overrides` (key, value) pairs, which tests use. Validates the result.
    pub fn load(file: Option<&Path>, overrides: &[(&str, &str)]) -> Result<Self, SettingsError> {
        let environment = match std::env::var(ENVIRONMENT_VAR) {
            Ok(name) => Some(name),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(SettingsError::Invalid(format!(
                    "{ENVIRONMENT_VAR} is not valid UTF-8"
                )))
            }
        };
        let layers = Layers {
            environment,
            config_dir: PathBuf::from(CONFIG_DIR),
            file: file.map(Path::to_owned),
            vars: None,
        };
        Self::load_layers(&layers, overrides)
    }

    pub(super) fn load_layers(
        layers: &Layers,
        overrides: &[(&str, &str)],
    ) -> Result<Self, SettingsError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(name) = &layers.environment {
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid {
                return Err(SettingsError::Invalid(format!(
                    "{ENVIRONMENT_VAR} must name an environment (letters, digits, '-' and '_'), \
                     e.g. {PRODUCTION}; unset it for development"
                )));
            }
            let path = layers.config_dir.join(format!("{name}.toml"));
            builder = builder.add_source(config::File::from(path).required(true));
        }
        if let Some(path) = &layers.file {
            builder = builder.add_source(config::File::from(path.as_path()).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .source(layers.vars.clone()),
        );
        for (key, value) in overrides {
            builder = builder.set_override(*key, *value)?;
        }
        let merged = builder.build()?;
        let origin = |key: &str| describe_origin(&merged, key, overrides);
        let mut settings: Settings = match merged.clone().try_deserialize() {
            Ok(settings) => settings,
            Err(err) => return Err(explain_load_error(err, &merged, overrides)),
        };
        settings.environment = layers.environment.clone();
        settings.check(&origin)?;
        Ok(settings)
    }

    /// Whether the production rules apply (`ATLAS_STRIPE_ENVIRONMENT=production`).
    pub fn is_production(&self) -> bool {
        self.environment.as_deref() == Some(PRODUCTION)
    }
}

/// `crypto.master_keys` → `ATLAS_STRIPE__CRYPTO__MASTER_KEYS`.
pub(super) fn variable_for(key: &str) -> String {
    format!("{ENV_PREFIX}__{}", key.to_uppercase().replace('.', "__"))
}

/// Where the value of `key` came from, in words an operator can act on.
fn describe_origin(
    merged: &config::Config,
    key: &str,
    overrides: &[(&str, &str)],
) -> Option<String> {
    let value = lookup(merged, key)?;
    let (leaf_key, origin) = first_leaf(key, value);
    Some(match origin {
        Some(FROM_VARIABLES) => format!("variable {}", variable_for(&leaf_key)),
        Some(path) => path.to_owned(),
        None if overrides.iter().any(|(k, _)| leaf_key.starts_with(k)) => "an override".to_owned(),
        None => "the built-in config/default.toml".to_owned(),
    })
}

/// The merged value at dotted `key`.
fn lookup<'a>(merged: &'a config::Config, key: &str) -> Option<&'a config::Value> {
    key.split('.')
        .try_fold(&merged.cache, |value, part| match &value.kind {
            config::ValueKind::Table(table) => table.get(part),
            _ => None,
        })
}

/// Whether `key` names a value rather than a section: a section's errors (a missing field)
/// keep `config`'s words.
fn is_leaf(merged: &config::Config, key: &str) -> bool {
    lookup(merged, key).is_some_and(|value| !matches!(value.kind, config::ValueKind::Table(_)))
}

/// A table's origin is its first leaf's (tables made by merging have none of their own).
fn first_leaf<'a>(key: &str, value: &'a config::Value) -> (String, Option<&'a str>) {
    if let config::ValueKind::Table(table) = &value.kind {
        if let Some((child, value)) = table.iter().min_by(|a, b| a.0.cmp(b.0)) {
            return first_leaf(&format!("{key}.{child}"), value);
        }
    }
    (key.to_owned(), value.origin())
}

/// An unknown key is reported with its dotted name and where it was set, and so is a value
/// its type refused (`de`'s words, e.g. "must be 1 to 10000, not 0"); other errors as
/// `config` words them.
fn explain_load_error(
    err: config::ConfigError,
    merged: &config::Config,
    overrides: &[(&str, &str)],
) -> SettingsError {
    let (section, message) = match &err {
        config::ConfigError::At {
            error,
            key: Some(key),
            ..
        } => (Some(key.clone()), error.to_string()),
        config::ConfigError::Message(message) => (None, message.clone()),
        _ => return SettingsError::Load(err),
    };
    if let Some(key) = section.as_deref().filter(|key| is_leaf(merged, key)) {
        if let config::ConfigError::At { error, .. } = &err {
            if matches!(**error, config::ConfigError::Message(_)) {
                return SettingsError::Invalid(match describe_origin(merged, key, overrides) {
                    Some(layer) => format!("{key} {message} (set in {layer})"),
                    None => format!("{key} {message}"),
                });
            }
        }
    }
    // serde's words: "unknown field `bnd`, expected one of `bind`, …"
    let Some((field, expected)) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
    else {
        return SettingsError::Load(err);
    };
    let key = match section {
        Some(section) => format!("{section}.{field}"),
        None => field.to_owned(),
    };
    let mut text = format!("unknown setting {key}");
    if let Some(layer) = describe_origin(merged, &key, overrides) {
        text.push_str(&format!(" (set in {layer})"));
    }
    let expected = expected.trim_start_matches(',').trim();
    if !expected.is_empty() {
        text.push_str(&format!("; {expected}"));
    }
    SettingsError::Invalid(text)
}
