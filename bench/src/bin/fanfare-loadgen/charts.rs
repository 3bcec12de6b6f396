//! What the report and the load sweep share: the raw writer's result (the floor every
//! server is measured against) and the charts' colours and error type.

use plotters::prelude::RGBColor;

pub(crate) const COLORS: [RGBColor; 4] = [
    RGBColor(200, 30, 60),
    RGBColor(40, 90, 200),
    RGBColor(30, 150, 70),
    RGBColor(120, 120, 120),
];

/// One `raw_writer` result: the machine's cost of a write to one of `sockets` sockets.
#[derive(serde::Deserialize)]
pub(crate) struct Raw {
    pub sockets: u64,
    pub coalesce: u64,
    pub us_per_write: f64,
    pub us_per_frame: f64,
    pub frames_per_cpu_s: f64,
    pub round_ms: f64,
}

pub(crate) fn draw<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow::anyhow!("cannot draw chart: {err:?}")
}
