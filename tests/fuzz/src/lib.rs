//! The fuzzed code, compiled from the host's own source files: the protocol decoder and the
//! plugin manifest parser depend on nothing else in the crate, so including them here keeps
//! the sanitizer build to serde, toml and anyhow instead of wasmtime, rdkafka and mongodb.

#[path = "../../../host/src/protocol.rs"]
pub mod protocol;

#[path = "../../../host/src/plugins/manifest.rs"]
pub mod manifest;

#[path = "../../../host/src/toml_text.rs"]
pub mod toml_text;
