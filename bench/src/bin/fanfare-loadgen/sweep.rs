//! The load sweep (`report --sweep DIR`): the steady scenario at several offered rates for every
//! server, as one table and two charts — latency against offered load (p50 dashed, p99 solid),
//! and server CPU per delivered frame against the raw writer's floor.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::charts::{COLORS, Raw, canvas, draw, finish, legend_line};
use crate::stats::RunResult;

/// Reads every `DIR/<rate>/<label>-steady.json`, prints the table, draws the charts.
pub fn write(dir: &Path, floors: &[Raw], charts: &Path) -> anyhow::Result<()> {
    let mut by_server: BTreeMap<String, Vec<RunResult>> = BTreeMap::new();
    for rate_dir in
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?
    {
        let rate_dir = rate_dir?.path();
        if !rate_dir.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&rate_dir)? {
            let file = file?.path();
            if file.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let run: RunResult = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a result", file.display()))?;
            by_server.entry(run.label.clone()).or_default().push(run);
        }
    }
    // Fanfare first, as in the other tables.
    let mut servers: Vec<(String, Vec<RunResult>)> = by_server.into_iter().collect();
    servers.sort_by_key(|(label, _)| !label.starts_with("fanfare"));
    for (_, runs) in &mut servers {
        runs.sort_by_key(|r| r.rate_offered);
    }
    // As in the scenario tables: the one-frame-per-write floor nearest in socket count.
    let floor_for = |listeners: u64| {
        floors
            .iter()
            .filter(|f| f.coalesce == 1)
            .min_by_key(|f| f.sockets.abs_diff(listeners))
    };
    println!("### latency and CPU against offered load (steady, sweep)\n");
    println!(
        "| server | likes/s offered | likes delivered/s | update frames/s | p50 | p99 | server µs per frame (× raw) | likes per server CPU-s | generator CPU |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (label, runs) in &servers {
        for run in runs {
            let ms = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.1} ms"));
            let per_frame = run
                .server_us_per_frame
                .map_or("–".to_owned(), |us| match floor_for(run.connections) {
                    Some(f) => format!("{us:.2} ({:.2}×)", us / f.us_per_write),
                    None => format!("{us:.2}"),
                });
            let per_cpu = if run.server_cpu_s > 0.0 {
                format!("{:.0}", run.likes_seen as f64 / run.server_cpu_s)
            } else {
                "–".to_owned()
            };
            println!(
                "| {label} | {} | {:.0} | {:.0} | {} | {} | {per_frame} | {per_cpu} | {:.0} %{} |",
                run.rate_offered,
                run.deliveries_per_s,
                run.frames_per_s,
                ms(run.p50_ms),
                ms(run.p99_ms),
                run.loadgen_core_share * 100.0,
                if run.instrument_bound {
                    " **instrument-bound**"
                } else {
                    ""
                },
            );
        }
    }
    println!();
    println!("![latency against offered load](charts/sweep-latency.png)");
    println!("![server CPU per frame against offered load](charts/sweep-cpu.png)\n");
    latency_chart(&charts.join("sweep-latency.png"), &servers)?;
    cpu_chart(&charts.join("sweep-cpu.png"), &servers, floors)?;
    Ok(())
}

fn rate_range(servers: &[(String, Vec<RunResult>)]) -> (f64, f64) {
    let rates = servers
        .iter()
        .flat_map(|(_, runs)| runs.iter().map(|r| r.rate_offered.max(1) as f64));
    let (lo, hi) = rates.fold((f64::MAX, 1.0f64), |(lo, hi), r| (lo.min(r), hi.max(r)));
    (lo.min(hi) / 1.2, hi * 1.2)
}

fn latency_chart(path: &Path, servers: &[(String, Vec<RunResult>)]) -> anyhow::Result<()> {
    let (lo, hi) = rate_range(servers);
    let max_ms = servers
        .iter()
        .flat_map(|(_, runs)| runs.iter().filter_map(|r| r.p99_ms))
        .fold(10.0, f64::max)
        * 1.5;
    let root = canvas(path, 520)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "steady: latency against offered load (p99 solid, p50 dashed)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), (1.0..max_ms).log_scale())
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("likes/s offered")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .y_desc("like sent → update received, ms")
        .draw()
        .map_err(draw)?;
    for (i, (label, runs)) in servers.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let point =
            |r: &RunResult, v: Option<f64>| v.map(|ms| (r.rate_offered as f64, ms.max(1.0)));
        let p99: Vec<(f64, f64)> = runs.iter().filter_map(|r| point(r, r.p99_ms)).collect();
        let p50: Vec<(f64, f64)> = runs.iter().filter_map(|r| point(r, r.p50_ms)).collect();
        chart
            .draw_series(LineSeries::new(p99.clone(), color.stroke_width(2)).point_size(4))
            .map_err(draw)?
            .label(label.clone())
            .legend(legend_line(color));
        chart
            .draw_series(DashedLineSeries::new(p50, 8, 5, color.stroke_width(2)))
            .map_err(draw)?;
    }
    finish(chart, &root, SeriesLabelPosition::UpperLeft)
}

fn cpu_chart(
    path: &Path,
    servers: &[(String, Vec<RunResult>)],
    floors: &[Raw],
) -> anyhow::Result<()> {
    let (lo, hi) = rate_range(servers);
    let max_us = servers
        .iter()
        .flat_map(|(_, runs)| runs.iter().filter_map(|r| r.server_us_per_frame))
        .chain(floors.iter().map(|f| f.us_per_frame))
        .fold(1.0, f64::max)
        * 1.15;
    let root = canvas(path, 520)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "steady: server CPU per delivered frame, and the raw writer's floor",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..max_us)
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("likes/s offered")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("server CPU µs per update frame")
        .draw()
        .map_err(draw)?;
    for (i, (label, runs)) in servers.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, f64)> = runs
            .iter()
            .filter_map(|r| r.server_us_per_frame.map(|us| (r.rate_offered as f64, us)))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(4))
            .map_err(draw)?
            .label(label.clone())
            .legend(legend_line(color));
    }
    for floor in floors {
        let line = vec![(lo, floor.us_per_frame), (hi, floor.us_per_frame)];
        chart
            .draw_series(DashedLineSeries::new(line, 6, 6, BLACK.stroke_width(1)))
            .map_err(draw)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!(
                    "raw: {} sockets, {} frame(s) per write",
                    floor.sockets, floor.coalesce
                ),
                (lo * 1.05, floor.us_per_frame + max_us * 0.045),
                ("sans-serif", 14),
            )))
            .map_err(draw)?;
    }
    finish(chart, &root, SeriesLabelPosition::UpperRight)
}
