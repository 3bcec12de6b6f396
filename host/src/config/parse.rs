//! Parsers for flag values clap cannot read by itself.

/// Settings of librdkafka that Fanfare's delivery guarantees rest on.
const KAFKA_OWNED: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "auto.offset.reset",
];

/// `key=value` for `--kafka-option`.
pub fn kafka_option(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not key=value"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("`{text}` has no key"));
    }
    if KAFKA_OWNED.contains(&key) {
        return Err(format!(
            "`{key}` is set by Fanfare (its delivery guarantees rest on it)"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// A network (`10.0.0.0/24`) or one address (`10.0.0.7`, as `/32` or `/128`).
pub fn network(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{text}` is neither an address nor a network like 10.0.0.0/24"))
}
