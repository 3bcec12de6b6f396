//! One rule for writing a TOML value as flag text, shared by the config file (whose keys are
//! the long flag names) and plugin manifests (whose config values reach guests as text).
//! Kept free of the rest of the crate so the fuzz targets can include it.

/// A TOML scalar as text; a list of scalars as comma-separated text (how list flags and
/// plugin config values are written). Tables and dates have no text form here.
pub fn toml_text(value: &toml::Value) -> Option<String> {
    let scalar = |v: &toml::Value| match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
            Some(v.to_string())
        }
        _ => None,
    };
    match value {
        toml::Value::Array(items) => items
            .iter()
            .map(scalar)
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(",")),
        other => scalar(other),
    }
}
