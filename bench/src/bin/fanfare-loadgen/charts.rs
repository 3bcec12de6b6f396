//! What the report and the load sweep share: the raw writer's result (the floor every
//! server is measured against), the charts' colours, canvas, legend and error type.

use plotters::coord::Shift;
use plotters::prelude::*;

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

/// A white 900-pixel-wide PNG canvas at `path`.
pub(crate) fn canvas(
    path: &std::path::Path,
    height: u32,
) -> anyhow::Result<DrawingArea<BitMapBackend<'_>, Shift>> {
    let root = BitMapBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    Ok(root)
}

/// The legend's sample of a series drawn as a line of `color`.
pub(crate) fn legend_line(color: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
}

/// Draws the legend at `position` and writes the file.
pub(crate) fn finish<'a, CT: CoordTranslate>(
    mut chart: ChartContext<'a, BitMapBackend<'a>, CT>,
    root: &DrawingArea<BitMapBackend<'a>, Shift>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()
        .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}
