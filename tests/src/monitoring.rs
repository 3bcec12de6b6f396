//! The metric names the shipped monitoring uses (`examples/monitoring/alerts.yml` and the
//! Grafana dashboard), to check them against what processes really serve: a renamed metric
//! must not leave an alert that can never fire.

use std::collections::BTreeSet;
use std::path::Path;

/// `fanfare_…` names in `text`, without the suffixes Prometheus adds to series.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut at = 0;
    while let Some(found) = text[at..].find("fanfare_") {
        let start = at + found;
        let end = start
            + bytes[start..]
                .iter()
                .take_while(|b| b.is_ascii_lowercase() || **b == b'_')
                .count();
        names.insert(family(&text[start..end]).to_owned());
        at = end.max(start + 1);
    }
    names
}

/// The family of a series name: `fanfare_ack_seconds_bucket` → `fanfare_ack_seconds`.
fn family(series: &str) -> &str {
    ["_bucket", "_sum", "_count", "_total", "_created"]
        .iter()
        .find_map(|suffix| series.strip_suffix(suffix))
        .unwrap_or(series)
}

/// Every metric family the alert rules and the dashboard refer to.
pub fn used_by_monitoring() -> anyhow::Result<BTreeSet<String>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/monitoring");
    let mut names = BTreeSet::new();
    for file in ["alerts.yml", "grafana-dashboard.json"] {
        names.extend(names_in(&std::fs::read_to_string(dir.join(file))?));
    }
    Ok(names)
}

/// The metric families a `/metrics` text declares (`# TYPE` lines, so families without a
/// sample yet count too).
pub fn served(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(|name| family(name).to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_as_families() {
        let names = names_in("rate(fanfare_ack_seconds_bucket[5m]) / fanfare_redis_up == 0");
        let expected: BTreeSet<String> = ["fanfare_ack_seconds", "fanfare_redis_up"]
            .map(str::to_owned)
            .into();
        assert_eq!(names, expected);
        assert_eq!(family("fanfare_likes_total"), "fanfare_likes");
    }
}
