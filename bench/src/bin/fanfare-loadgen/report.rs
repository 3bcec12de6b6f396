//! `fanfare-loadgen report`: merges result files into a markdown table per scenario (with
//! ratios of the first server to each other one) and PNG charts (latency CDF, updates/s).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;

use crate::charts::{COLORS, Raw, canvas, draw, finish, legend_line};
use crate::stats::RunResult;

pub fn write(
    files: &[PathBuf],
    raw: &[PathBuf],
    sweep: Option<&Path>,
    charts: &Path,
) -> anyhow::Result<()> {
    register_font()?;
    let mut floors: Vec<Raw> = Vec::new();
    for file in raw {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        floors.push(
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a raw_writer result", file.display()))?,
        );
    }
    if !floors.is_empty() {
        println!("### physical limit (raw_writer: one pre-framed write per socket per round)\n");
        println!(
            "| sockets | frames per write | µs per write | µs per frame | frames per CPU-s | round |"
        );
        println!("|---|---|---|---|---|---|");
        for f in &floors {
            println!(
                "| {} | {} | {:.2} | {:.2} | {:.0} | {:.1} ms |",
                f.sockets,
                f.coalesce,
                f.us_per_write,
                f.us_per_frame,
                f.frames_per_cpu_s,
                f.round_ms
            );
        }
        println!();
    }
    // The one-frame-per-write floor nearest in socket count to a run's listeners.
    let floor_for = |listeners: u64| {
        floors
            .iter()
            .filter(|f| f.coalesce == 1)
            .min_by_key(|f| f.sockets.abs_diff(listeners))
    };
    let mut by_scenario: BTreeMap<String, Vec<RunResult>> = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let result: RunResult = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a result", file.display()))?;
        by_scenario
            .entry(result.scenario.clone())
            .or_default()
            .push(result);
    }
    std::fs::create_dir_all(charts)?;
    for (scenario, runs) in &by_scenario {
        println!("### {scenario}\n");
        println!(
            "| server | listeners up | likes/s offered | update frames/s | likes delivered/s | p50 | p90 | p99 | max | server RSS | RSS per listener | server CPU s | server µs per frame (× raw) | server µs per like | likes per server CPU-s | generator CPU | errors / disconnects |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for run in runs {
            let ms = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.1} ms"));
            let generator_share = format!(
                "{:.0} %{}",
                run.loadgen_core_share * 100.0,
                if run.instrument_bound {
                    " **instrument-bound**"
                } else {
                    ""
                }
            );
            println!(
                "| {} | {} / {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {:.1} MiB | {} | {:.1} | {} | {} | {} | {} | {} / {} |",
                run.label,
                run.connected,
                run.connections,
                run.rate_offered,
                run.frames_per_s,
                run.deliveries_per_s,
                ms(run.p50_ms),
                ms(run.p90_ms),
                ms(run.p99_ms),
                ms(run.max_ms),
                run.server_rss_kib as f64 / 1024.0,
                run.server_rss_per_conn_kib
                    .map_or("–".to_owned(), |v| format!("{v:.2} KiB")),
                run.server_cpu_s,
                run.server_us_per_frame.map_or("–".to_owned(), |us| {
                    match floor_for(run.connections) {
                        Some(f) => format!("{us:.2} ({:.2}×)", us / f.us_per_write),
                        None => format!("{us:.2}"),
                    }
                }),
                run.server_us_per_like
                    .map_or("–".to_owned(), |us| format!("{us:.2}")),
                per_cpu_second(run).map_or("–".to_owned(), |v| format!("{v:.0}")),
                generator_share,
                run.errors,
                run.disconnects,
            );
        }
        if let Some((first, others)) = runs.split_first() {
            for other in others {
                let ratio = |a: f64, b: f64| {
                    if b > 0.0 {
                        format!("{:.1}×", a / b)
                    } else {
                        "∞ (peer delivered nothing)".to_owned()
                    }
                };
                let rss = match (first.server_rss_per_conn_kib, other.server_rss_per_conn_kib) {
                    (Some(a), Some(b)) if a > 0.0 => {
                        format!(", memory per listener {:.1}× less", b / a)
                    }
                    _ => String::new(),
                };
                if first.likes_sent == 0 && other.likes_sent == 0 {
                    // Idle: nothing is delivered by anyone; only memory compares.
                    println!(
                        "\n{} ÷ {}: {}",
                        first.label,
                        other.label,
                        rss.trim_start_matches(", ")
                    );
                    continue;
                }
                let per_cpu = match (per_cpu_second(first), per_cpu_second(other)) {
                    (Some(a), Some(b)) => {
                        format!(", likes delivered per server CPU-s {}", ratio(a, b))
                    }
                    _ => String::new(),
                };
                println!(
                    "\n{} ÷ {}: likes delivered/s {}, update frames/s {}{per_cpu}{rss}",
                    first.label,
                    other.label,
                    ratio(first.deliveries_per_s, other.deliveries_per_s),
                    ratio(first.frames_per_s, other.frames_per_s),
                );
            }
        }
        if let Some(reconnect) = runs
            .iter()
            .find_map(|r| r.latency.reconnect_all_ms.map(|ms| (r.label.clone(), ms)))
        {
            for run in runs {
                if let Some(ms) = run.latency.reconnect_all_ms {
                    println!(
                        "\n{}: all listeners subscribed again {ms:.0} ms after the storm",
                        run.label
                    );
                }
            }
            let _ = reconnect;
        }
        println!();
        latency_chart(
            &charts.join(format!("{scenario}-latency.png")),
            scenario,
            runs,
        )?;
        throughput_chart(
            &charts.join(format!("{scenario}-throughput.png")),
            scenario,
            runs,
        )?;
    }
    if let Some(dir) = sweep {
        crate::sweep::write(dir, &floors, charts)?;
    }
    Ok(())
}

/// Likes delivered per CPU second of the server.
fn per_cpu_second(run: &RunResult) -> Option<f64> {
    (run.server_cpu_s > 0.0 && run.likes_seen > 0).then(|| run.likes_seen as f64 / run.server_cpu_s)
}

/// plotters draws text with ab_glyph, which needs a font registered by hand.
fn register_font() -> anyhow::Result<()> {
    let candidates = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    ];
    let path = candidates
        .iter()
        .find(|p| Path::new(p).exists())
        .context("no TTF font found (apt-get install fonts-dejavu-core)")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("cannot load font {path}"))?;
    Ok(())
}

fn latency_chart(path: &Path, scenario: &str, runs: &[RunResult]) -> anyhow::Result<()> {
    let max_ms = runs
        .iter()
        .filter_map(|r| r.latency.quantile_ms(0.999))
        .fold(1.0, f64::max);
    let root = canvas(path, 500)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{scenario}: like-sent → update-received latency (CDF)"),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_ms, 0.0..1.0)
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("ms")
        .y_desc("fraction of deliveries")
        .draw()
        .map_err(draw)?;
    for (i, run) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(run.latency.cdf(), color.stroke_width(2)))
            .map_err(draw)?
            .label(run.label.clone())
            .legend(legend_line(color));
    }
    finish(chart, &root, SeriesLabelPosition::MiddleRight)
}

fn throughput_chart(path: &Path, scenario: &str, runs: &[RunResult]) -> anyhow::Result<()> {
    let max = runs
        .iter()
        .flat_map(|r| r.per_second.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let seconds = runs
        .iter()
        .map(|r| r.per_second.len())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let root = canvas(path, 500)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{scenario}: update frames received per second"),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..seconds, 0.0..max * 1.1)
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("s")
        .y_desc("frames/s")
        .draw()
        .map_err(draw)?;
    for (i, run) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points = run
            .per_second
            .iter()
            .enumerate()
            .map(|(s, n)| (s as f64, *n as f64));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(draw)?
            .label(run.label.clone())
            .legend(legend_line(color));
    }
    finish(chart, &root, SeriesLabelPosition::MiddleRight)
}
