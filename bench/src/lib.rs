//! Shared by the benchmark binaries: the node flags a load generator needs, what a process
//! costs, read from `/proc`, and where a server's WebSocket frame ends in raw bytes.

/// Node flags for a load generator: few users and connections sending fast, so the per-user,
/// per-connection and per-address limits meant for real clients are lifted.
pub const UNLIMITED_NODE_ARGS: &[&str] = &[
    "--max-messages-per-second",
    "1000000",
    "--max-likes-per-user",
    "0",
    "--max-connections-per-user",
    "1000000",
    "--max-connections-per-ip",
    "1000000",
];

/// (VmRSS KiB, user+system CPU seconds) of a process; zeros if it is gone.
pub fn proc_stats(pid: u32) -> (u64, f64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let fields: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            let ticks: f64 =
                fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(0.0);
    (rss, cpu)
}

/// (payload start, payload end) and the frame's length, if a whole unmasked frame is there.
pub fn server_frame(bytes: &[u8]) -> Option<((usize, usize), usize)> {
    let short = *bytes.get(1)? & 0x7f;
    let (len, header) = match short {
        126 => (
            u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    (bytes.len() >= header + len).then_some(((header, header + len), header + len))
}
