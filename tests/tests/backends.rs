//! How a node reaches its services securely: librdkafka settings passed through
//! (`--kafka-option`, e.g. SASL/SSL), and Redis with an ACL user over TLS (`rediss://`).

use fanfare_tests::PATIENCE;

/// Runs the node with `args` until it exits (it must refuse to start): its stderr.
async fn refused_start(args: &[&str]) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let mut node = tokio::process::Command::new(fanfare_tests::fanfare_bin());
    node.args(["--listen", "127.0.0.1:0", "--log", "warn"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(args)
        .kill_on_drop(true);
    let output = tokio::time::timeout(PATIENCE, node.output())
        .await
        .map_err(|_| anyhow::anyhow!("the node started with {args:?}"))??;
    anyhow::ensure!(!output.status.success(), "exit: {:?}", output.status);
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test]
async fn kafka_options_reach_librdkafka_and_guarantees_stay_fanfares() -> anyhow::Result<()> {
    // librdkafka itself refuses a setting it does not know: the option got that far.
    let stderr = refused_start(&[
        "--kafka",
        "127.0.0.1:1",
        "--kafka-option",
        "no.such.setting=1",
    ])
    .await?;
    assert!(
        stderr.contains("No such configuration property") && stderr.contains("no.such.setting"),
        "{stderr}"
    );
    // What the delivery guarantees rest on cannot be overridden.
    for owned in [
        "acks=0",
        "enable.idempotence=false",
        "bootstrap.servers=x:1",
    ] {
        let stderr = refused_start(&["--kafka", "127.0.0.1:1", "--kafka-option", owned]).await?;
        assert!(stderr.contains("set by Fanfare"), "{owned}: {stderr}");
    }
    Ok(())
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "openssl {args:?} failed");
    Ok(())
}

/// A CA (`ca.pem`) and a server certificate for 127.0.0.1 it signed (`server.pem`, `server.key`).
fn certificates(dir: &std::path::Path) -> anyhow::Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=fanfare test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    )?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    )?;
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n")?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    )
}

#[tokio::test]
async fn redis_with_an_acl_user_over_tls() -> anyhow::Result<()> {
    use fanfare_tests::NodeProcess;
    use fanfare_tests::process::{Log, Ready, Service, Spec};

    let dir = tempfile::tempdir()?;
    certificates(dir.path())?;
    let port = fanfare_tests::free_port()?;
    let file = |name: &str| dir.path().join(name).to_string_lossy().to_string();
    // TLS only, the default user off: only `fanfare` with its password gets in.
    let spec = Spec::new("redis-server", "redis-server", Ready::Port(port))
        .args([
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--tls-port", &port.to_string()])
        .args([
            "--tls-cert-file",
            &file("server.pem"),
            "--tls-key-file",
            &file("server.key"),
        ])
        .args([
            "--tls-ca-cert-file",
            &file("ca.pem"),
            "--tls-auth-clients",
            "no",
        ])
        .args(["--user", "default", "off"])
        .args([
            "--user",
            "fanfare",
            "on",
            ">s3cret-pass",
            "~*",
            "&*",
            "+@all",
        ])
        .args(["--dir", &file("")])
        .log(Log::Discard(None));
    let _redis = Service::start(spec).await?;
    let url = format!("rediss://fanfare:s3cret-pass@127.0.0.1:{port}");
    let ca = file("ca.pem");

    // Two nodes through it: a like on one reaches a listener on the other, counted once.
    let node = |url: String| {
        let ca = ca.clone();
        async move {
            NodeProcess::fresh(&["--redis", &url, "--redis-ca", &ca, "--insecure-dev-auth"]).await
        }
    };
    let (a, b) = (node(url.clone()).await?, node(url.clone()).await?);
    for n in [&a, &b] {
        n.wait_metric("fanfare_redis_up", |v| v == 1.0).await?;
    }
    let mut listener = b.connect("listener").await?;
    listener.subscribe("secure").await?;
    b.wait_metric("fanfare_bus_channels", |v| v >= 1.0).await?;
    let mut liker = a.connect("liker").await?;
    assert_eq!(liker.like("like", "secure", "k1").await?["count"], 1);
    let update = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        listener.recv_until(|f| f["type"] == "likes"),
    )
    .await??;
    assert_eq!(update["count"], 1, "{update}");
    assert_eq!(b.track_count("secure").await?, 1);

    // A wrong password, or no CA to trust the certificate: the node runs degraded, never up.
    let wrong = format!("rediss://fanfare:wrong@127.0.0.1:{port}");
    for (label, args) in [
        ("wrong password", vec!["--redis", &wrong, "--redis-ca", &ca]),
        ("untrusted certificate", vec!["--redis", &url]),
    ] {
        let mut args = args;
        args.push("--insecure-dev-auth");
        let refused = NodeProcess::fresh(&args).await?;
        let (_, readyz) = refused.get("/readyz").await?;
        assert!(readyz.contains("degraded"), "{label}: {readyz}");
        assert_eq!(refused.metric("fanfare_redis_up").await?, 0.0, "{label}");
        let (_, metrics) = refused.get("/metrics").await?;
        assert!(
            !metrics.contains("s3cret-pass"),
            "{label}: a password in the metrics"
        );
    }
    Ok(())
}

#[tokio::test]
async fn sentinel_urls_carry_the_masters_password() -> anyhow::Result<()> {
    use fanfare_tests::NodeProcess;
    use fanfare_tests::process::{Log, Ready, Service, Spec};

    let dir = tempfile::tempdir()?;
    let master_port = fanfare_tests::free_port()?;
    let sentinel_port = fanfare_tests::free_port()?;
    let dir_arg = dir.path().to_string_lossy().to_string();
    let master = Spec::new("redis-server", "redis-server", Ready::Port(master_port))
        .args(["--port", &master_port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--dir", &dir_arg])
        .args(["--requirepass", "m4ster-pass"])
        .log(Log::Discard(None));
    let _master = Service::start(master).await?;
    // The sentinel itself has no password; it knows the master's.
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {sentinel_port}\nbind 127.0.0.1\ndir {dir_arg}\n\
             sentinel monitor mymaster 127.0.0.1 {master_port} 1\n\
             sentinel auth-pass mymaster m4ster-pass\n"
        ),
    )?;
    let sentinel = Spec::new("redis-sentinel", "redis-server", Ready::Port(sentinel_port))
        .args([conf.as_os_str(), std::ffi::OsStr::new("--sentinel")])
        .log(Log::Discard(None));
    let _sentinel = Service::start(sentinel).await?;

    let url = format!("redis+sentinel://:m4ster-pass@127.0.0.1:{sentinel_port}/mymaster");
    let node = NodeProcess::fresh(&["--redis", &url, "--insecure-dev-auth"]).await?;
    node.wait_metric("fanfare_redis_up", |v| v == 1.0).await?;
    let mut ana = node.connect("ana").await?;
    assert_eq!(ana.like("like", "sentinel", "k1").await?["count"], 1);
    assert_eq!(node.track_count("sentinel").await?, 1);

    let wrong = format!("redis+sentinel://:wrong@127.0.0.1:{sentinel_port}/mymaster");
    let refused = NodeProcess::fresh(&["--redis", &wrong, "--insecure-dev-auth"]).await?;
    let (_, readyz) = refused.get("/readyz").await?;
    assert!(readyz.contains("degraded"), "{readyz}");
    assert_eq!(refused.metric("fanfare_redis_up").await?, 0.0);
    Ok(())
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The `--kafka-option`s of a librdkafka client that logs in as `fanfare` with `password`
/// over SASL_SSL, trusting `ca`.
fn sasl_ssl_options(password: &str, ca: &str) -> Vec<String> {
    [
        "security.protocol=SASL_SSL".to_owned(),
        "sasl.mechanism=PLAIN".to_owned(),
        "sasl.username=fanfare".to_owned(),
        format!("sasl.password={password}"),
        format!("ssl.ca.location={ca}"),
    ]
    .into_iter()
    .flat_map(|option| ["--kafka-option".to_owned(), option])
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_over_sasl_ssl_and_mongodb_over_tls_carry_likes_to_storage() -> anyhow::Result<()> {
    use fanfare_tests::NodeProcess;
    use fanfare_tests::services::{
        KafkaBroker, Listener, MongoServer, MongoTls, WorkerProcess, unique,
    };

    let dir = tempfile::tempdir()?;
    certificates(dir.path())?;
    let file = |name: &str| dir.path().join(name).to_string_lossy().to_string();
    // Kafka's PEM key store: the (unencrypted PKCS#8) key, then the certificate.
    std::fs::write(
        dir.path().join("keystore.pem"),
        [
            std::fs::read_to_string(dir.path().join("server.key"))?,
            std::fs::read_to_string(dir.path().join("server.pem"))?,
        ]
        .concat(),
    )?;
    // Clients must log in (SASL PLAIN, users `broker` and `fanfare`) over TLS only.
    let listener = Listener {
        protocol: "SASL_SSL".to_owned(),
        properties: format!(
            "sasl.enabled.mechanisms=PLAIN\n\
             sasl.mechanism.inter.broker.protocol=PLAIN\n\
             listener.name.sasl_ssl.plain.sasl.jaas.config=\
             org.apache.kafka.common.security.plain.PlainLoginModule required \
             username=\"broker\" password=\"broker-secret\" \
             user_broker=\"broker-secret\" user_fanfare=\"fanfare-secret\";\n\
             ssl.keystore.type=PEM\n\
             ssl.keystore.location={}\n\
             ssl.truststore.type=PEM\n\
             ssl.truststore.location={}\n",
            file("keystore.pem"),
            file("ca.pem")
        ),
    };
    let kafka = KafkaBroker::start_secured(&listener).await?;
    // FerretDB reached over TLS only: the worker stores and the node reads history through it.
    let mongo = MongoServer::start_tls(&MongoTls {
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server.key"),
        ca: dir.path().join("ca.pem"),
    })
    .await?;
    assert!(mongo.url.contains("tls=true"), "{}", mongo.url);
    let (topic, database) = (unique("likes"), unique("fanfare").replace('-', "_"));
    let kafka_args = |password: &str| {
        let mut args = vec![
            "--kafka".to_owned(),
            kafka.brokers.clone(),
            "--kafka-topic".to_owned(),
            topic.clone(),
        ];
        args.extend(sasl_ssl_options(password, &file("ca.pem")));
        args
    };

    // The node produces and the worker consumes through the secured listener.
    let node_dir = tempfile::tempdir()?;
    let mut node_args = kafka_args("fanfare-secret");
    node_args.extend(
        ["--kafka-ack-timeout", "3000", "--mongo", &mongo.url]
            .into_iter()
            .chain(["--mongo-database", &database])
            .map(str::to_owned),
    );
    let node = NodeProcess::start(node_dir.path(), &strs(&node_args)).await?;
    let mut worker_args = kafka_args("fanfare-secret");
    worker_args.extend(
        ["--group", &unique("workers"), "--mongo", &mongo.url]
            .into_iter()
            .chain(["--mongo-database", &database])
            .map(str::to_owned),
    );
    let _worker = WorkerProcess::start(&strs(&worker_args)).await?;
    let mut liker = node.connect("liker").await?;
    for i in 0..5 {
        let ack = liker
            .like("like", &format!("sasl:{i}"), &format!("k{i}"))
            .await?;
        assert_eq!(ack["count"], 1, "{ack}");
    }
    let db = mongo.database(&database).await?;
    let stored =
        fanfare_tests::stored::wait_stored(&db, 5, std::time::Duration::from_secs(60)).await?;
    assert_eq!(
        stored, 5,
        "the worker stored the 5 likes it consumed over SASL_SSL"
    );
    let (likes, _) = node.history_last_hour("sasl:0", "minute").await?;
    assert_eq!(likes, 1, "history read from MongoDB over TLS");
    assert_eq!(node.metric("fanfare_kafka_up").await?, 1.0);
    let from_kafka = node
        .metric("fanfare_durable_acks_total{source=\"kafka\"}")
        .await?;
    assert!(
        from_kafka >= 1.0,
        "acks confirmed by the broker: {from_kafka}"
    );

    // A wrong password: the broker refuses the login, so likes are acked from the spill only.
    let refused_dir = tempfile::tempdir()?;
    let mut refused_args = kafka_args("wrong");
    refused_args.extend(["--kafka-ack-timeout".to_owned(), "300".to_owned()]);
    let refused = NodeProcess::start(refused_dir.path(), &strs(&refused_args)).await?;
    let mut client = refused.connect("liker").await?;
    assert_eq!(client.like("like", "sasl:refused", "r1").await?["count"], 1);
    refused
        .wait_metric("fanfare_kafka_up", |up| up == 0.0)
        .await?;
    assert_eq!(
        refused
            .metric("fanfare_durable_acks_total{source=\"kafka\"}")
            .await?,
        0.0,
        "nothing confirmed by a broker that refused the login"
    );
    assert_eq!(
        refused.metric("fanfare_kafka_spill_events").await?,
        1.0,
        "the like waits in the spill"
    );
    Ok(())
}
