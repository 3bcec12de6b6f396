use super::*;

fn load(args: &[&str]) -> anyhow::Result<Config> {
    Config::load_from(args.iter().map(OsString::from))
}

#[test]
fn defaults_match_the_docs() -> anyhow::Result<()> {
    let config = load(&["fanfare"])?;
    assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(config.data_dir, PathBuf::from("./data"));
    assert_eq!(config.heartbeat_timeout, 75_000);
    Ok(())
}

#[test]
fn toml_fills_what_flags_leave_out() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("fanfare.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:9000\"\nbroadcast-window = 20\nmax_frame_bytes = 1000\n",
    )?;
    let path = file.to_string_lossy().to_string();
    let config = load(&["fanfare", "--config", &path, "--max-frame-bytes", "2000"])?;
    assert_eq!(config.listen.port(), 9000);
    assert_eq!(config.broadcast_window, 20);
    assert_eq!(config.max_frame_bytes, 2000, "flag beats file");
    Ok(())
}

#[test]
fn bad_files_and_values_are_clear_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "listen_port = 1\n")?;
    let path = file.to_string_lossy().to_string();
    let err = load(&["fanfare", "--config", &path]).unwrap_err();
    assert!(
        err.to_string().contains("unknown option `listen_port`"),
        "{err:#}"
    );
    std::fs::write(&file, "heartbeat-timeout = \"soon\"\n")?;
    assert!(load(&["fanfare", "--config", &path]).is_err());
    assert!(load(&["fanfare", "--broadcast-window", "500"]).is_err());
    assert!(load(&["fanfare", "--heartbeat-interval", "80000"]).is_err());
    Ok(())
}

#[test]
fn dev_auth_is_refused_where_it_is_not_harmless() -> anyhow::Result<()> {
    for exposed in [
        &["fanfare", "--listen", "0.0.0.0:8080"][..],
        &["fanfare", "--listen", "[::]:8080"],
        &["fanfare", "--listen", "10.1.2.3:8080"],
        &["fanfare", "--redis", "redis://127.0.0.1:6379"],
    ] {
        let err = load(exposed).expect_err("dev auth accepted");
        assert!(
            err.to_string().contains("--auth jwt") && err.to_string().contains("?user="),
            "{exposed:?}: {err:#}"
        );
        let mut demo = exposed.to_vec();
        demo.push("--insecure-dev-auth");
        load(&demo)?;
        let mut jwt = exposed.to_vec();
        jwt.extend(["--auth", "jwt"]);
        load(&jwt)?;
    }
    load(&["fanfare", "--listen", "127.0.0.1:8080"])?;
    load(&["fanfare", "--listen", "[::1]:8080"])?;
    Ok(())
}

#[test]
fn proxy_protocol_needs_trusted_proxies_and_reads_networks() -> anyhow::Result<()> {
    let err = load(&["fanfare", "--proxy-protocol", "--auth", "jwt"]).expect_err("no proxies");
    assert!(err.to_string().contains("--trusted-proxies"), "{err:#}");
    let err = load(&["fanfare", "--trusted-proxies", "10.0.0.1"]).expect_err("no protocol");
    assert!(err.to_string().contains("--proxy-protocol"), "{err:#}");
    let config = load(&[
        "fanfare",
        "--auth",
        "jwt",
        "--proxy-protocol",
        "--trusted-proxies",
        "10.0.0.0/24, 127.0.0.1,::1",
    ])?;
    let nets: Vec<String> = config
        .trusted_proxies
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["10.0.0.0/24", "127.0.0.1/32", "::1/128"]);
    let err = load(&[
        "fanfare",
        "--proxy-protocol",
        "--trusted-proxies",
        "10.0.0.300",
    ])
    .expect_err("bad address");
    assert!(err.to_string().contains("10.0.0.300"), "{err:#}");
    // Behind a balancer, dev auth is exposed even on a loopback listener.
    let err = load(&[
        "fanfare",
        "--proxy-protocol",
        "--trusted-proxies",
        "127.0.0.1",
    ])
    .expect_err("dev auth behind a balancer");
    assert!(err.to_string().contains("--proxy-protocol"), "{err:#}");
    Ok(())
}

#[test]
fn an_admin_listener_off_loopback_needs_a_token() -> anyhow::Result<()> {
    let err = load(&["fanfare", "--admin-listen", "0.0.0.0:9100"]).expect_err("no token");
    assert!(err.to_string().contains("--admin-token"), "{err:#}");
    load(&[
        "fanfare",
        "--admin-listen",
        "0.0.0.0:9100",
        "--admin-token",
        "t",
    ])?;
    load(&["fanfare", "--admin-listen", "127.0.0.1:9100"])?;
    Ok(())
}

#[test]
fn kafka_options_are_key_value_and_leave_guarantees_alone() -> anyhow::Result<()> {
    let config = load(&[
        "fanfare",
        "--kafka-option",
        "security.protocol=SASL_SSL",
        "--kafka-option",
        "sasl.password=a=b",
    ])?;
    assert_eq!(
        config.shared.kafka_options,
        [
            ("security.protocol".to_owned(), "SASL_SSL".to_owned()),
            ("sasl.password".to_owned(), "a=b".to_owned()),
        ]
    );
    assert!(load(&["fanfare", "--kafka-option", "novalue"]).is_err());
    assert!(load(&["fanfare", "--kafka-option", "=x"]).is_err());
    let err = load(&["fanfare", "--kafka-option", "enable.auto.commit=true"]).expect_err("owned");
    assert!(err.to_string().contains("set by Fanfare"), "{err:#}");
    Ok(())
}
