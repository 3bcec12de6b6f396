//! Wasm plugins in the real binary: each slot's effect, bad guests cut off within budget with
//! the slot's failure policy, and hot reload under load without dropping a socket or a like.

use std::time::Duration;

use fanfare_tests::{NodeProcess, PATIENCE, PluginDir, WsClient};
use serde_json::{Value, json};

/// A node with its own data directory, running the plugin directory's manifest.
async fn start_with(plugins: &PluginDir) -> anyhow::Result<(tempfile::TempDir, NodeProcess)> {
    let data = tempfile::tempdir()?;
    let manifest = plugins.manifest_path();
    let node = NodeProcess::start(data.path(), &["--plugins", &manifest.to_string_lossy()]).await?;
    Ok((data, node))
}

async fn status(node: &NodeProcess) -> anyhow::Result<Value> {
    let (code, body) = node.get("/admin/plugins").await?;
    anyhow::ensure!(code == 200, "GET /admin/plugins: {code} {body}");
    Ok(serde_json::from_str(&body)?)
}

fn slot<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["slots"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["slot"] == name))
        .unwrap_or(&Value::Null)
}

/// Polls `/admin/plugins` until `check` holds for the slot.
async fn wait_slot(
    node: &NodeProcess,
    name: &str,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let current = status(node).await?;
        if check(slot(&current, name)) {
            return Ok(slot(&current, name).clone());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "slot {name} never matched: {current}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn each_slot_shapes_what_clients_see() -> anyhow::Result<()> {
    let plugins = PluginDir::new()?;
    plugins.write_manifest(
        r#"
        [rate_limit]
        component = "rate_limit_token_bucket.wasm"
        config = { likes = 3, window_ms = 60000 }
        [validate]
        component = "validate_basic.wasm"
        config = { banned_users = ["spammer"], blocked_tracks = ["leak:*"] }
        [shape]
        component = "shape_json.wasm"
        config = { hide_users = true }
        "#,
    )?;
    let (_data, node) = start_with(&plugins).await?;

    let mut spammer = node.connect("spammer").await?;
    let refused = spammer.like("like", "t1", "s1").await?;
    assert_eq!(
        (refused["code"].as_str(), refused["id"].as_str()),
        (Some("rejected"), Some("s1")),
        "{refused}"
    );
    assert_eq!(refused["message"], "this user may not like tracks");

    let mut listener = node.connect("listener").await?;
    listener.subscribe("t1").await?;
    let mut carol = node.connect("carol").await?;
    let blocked = carol.like("like", "leak:1", "c0").await?;
    assert_eq!(blocked["code"], "rejected", "{blocked}");
    for i in 1..=2 {
        assert_eq!(
            carol
                .like("like", &format!("t{i}"), &format!("c{i}"))
                .await?["type"],
            "ack"
        );
    }
    // The third like in the window (the blocked one counted too) trips the limit of 3.
    let limited = carol.like("like", "t3", "c3").await?;
    assert_eq!(limited["code"], "rate_limited", "{limited}");
    assert!(
        limited["retry_after_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 0 && ms <= 60_000),
        "{limited}"
    );

    let update = listener.recv_until(|f| f["type"] == "likes").await?;
    assert_eq!(update["count"], 1);
    assert_eq!(
        update["recent"],
        json!([{"user":"someone","id":"c1","action":"like"}]),
        "shaped by the plugin"
    );

    let now = status(&node).await?;
    assert_eq!(slot(&now, "validate")["rejections"], 2);
    assert_eq!(slot(&now, "rate_limit")["rejections"], 1);
    assert!(
        node.metric("fanfare_likes_total{outcome=\"rate_limited\"}")
            .await?
            == 1.0
    );
    Ok(())
}

#[tokio::test]
async fn misbehaving_guests_are_cut_off_and_the_policy_decides() -> anyhow::Result<()> {
    let plugins = PluginDir::new()?;
    let manifest = |mode: &str, policy: &str| {
        format!(
            "[validate]\ncomponent = \"misbehave.wasm\"\npolicy = \"{policy}\"\nbudget_ms = 20\nmemory_mb = 8\nconfig = {{ mode = \"{mode}\" }}\n"
        )
    };
    plugins.write_manifest(&manifest("accept", "fail_closed"))?;
    let (_data, node) = start_with(&plugins).await?;
    let mut bystander = node.connect("bystander").await?;
    bystander.subscribe("calm").await?;

    for (n, mode) in ["trap", "loop", "alloc"].into_iter().enumerate() {
        plugins.write_manifest(&manifest(mode, "fail_closed"))?;
        let (code, report) = node.post("/admin/plugins/reload").await?;
        assert_eq!(code, 200, "{report}");
        let mut client = node.connect(&format!("victim{n}")).await?;
        let started = tokio::time::Instant::now();
        let refused = client.like("like", "calm", &format!("{mode}-1")).await?;
        assert_eq!(refused["code"], "rejected", "{mode}: {refused}");
        assert!(
            refused["message"]
                .as_str()
                .is_some_and(|m| m.contains("unavailable")),
            "{refused}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{mode} cut off within its budget"
        );
        // The node keeps serving everyone.
        bystander.send(json!({"type":"ping"})).await?;
        assert_eq!(bystander.recv().await?, json!({"type":"pong"}));
        let counters = slot(&status(&node).await?, "validate").clone();
        let failures =
            counters["errors"].as_u64().unwrap_or(0) + counters["timeouts"].as_u64().unwrap_or(0);
        assert!(failures >= 1, "{mode}: {counters}");
        if mode == "loop" {
            assert!(
                counters["timeouts"].as_u64().unwrap_or(0) >= 1,
                "{counters}"
            );
        }
    }

    // The instruction budget (fuel) cuts a loop off by itself: with a 1 s time budget and the
    // smallest fuel the loop ends long before the epoch deadline would end it.
    plugins.write_manifest(
        "[validate]\ncomponent = \"misbehave.wasm\"\nbudget_ms = 1000\nfuel = 10000\nconfig = { mode = \"loop\" }\n",
    )?;
    assert_eq!(node.post("/admin/plugins/reload").await?.0, 200);
    let timeouts_before = slot(&status(&node).await?, "validate")["timeouts"]
        .as_u64()
        .unwrap_or(0);
    let mut client = node.connect("fueled").await?;
    let started = tokio::time::Instant::now();
    let refused = client.like("like", "calm", "fuel-1").await?;
    assert_eq!(refused["code"], "rejected", "{refused}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "cut off by fuel, not by the 1 s deadline: {:?}",
        started.elapsed()
    );
    let counters = slot(&status(&node).await?, "validate").clone();
    assert_eq!(counters["fuel"], 10_000, "{counters}");
    assert!(
        counters["timeouts"].as_u64().unwrap_or(0) > timeouts_before,
        "{counters}"
    );

    // fail_open: the same broken plugin lets likes through.
    plugins.write_manifest(&manifest("trap", "fail_open"))?;
    assert_eq!(node.post("/admin/plugins/reload").await?.0, 200);
    let mut client = node.connect("lucky").await?;
    let ack = client.like("like", "calm", "open-1").await?;
    assert_eq!(ack["type"], "ack", "{ack}");
    let update = bystander.recv_until(|f| f["type"] == "likes").await?;
    assert_eq!(update["count"], 1);
    assert!(
        node.metric("fanfare_plugin_events_total{slot=\"validate\",event=\"timeout\"}")
            .await?
            >= 1.0
    );
    Ok(())
}

#[tokio::test]
async fn hot_reload_under_load_drops_no_socket_and_no_like() -> anyhow::Result<()> {
    let plugins = PluginDir::new()?;
    plugins.write_manifest(
        "[validate]\ncomponent = \"misbehave.wasm\"\nconfig = { mode = \"reject\" }\n",
    )?;
    let (_data, node) = start_with(&plugins).await?;
    let mut listeners = Vec::new();
    for i in 0..20 {
        let mut client = node.connect(&format!("listener{i}")).await?;
        client.subscribe("live").await?;
        listeners.push(client);
    }

    // Likers keep liking (a fresh user per like) while the operator swaps the plugin.
    let swapped = std::sync::atomic::AtomicBool::new(false);
    let likers = (0..4).map(|l| {
        let node = &node;
        let swapped = &swapped;
        async move {
            let mut acked = 0u64;
            let mut rejected = 0u64;
            let mut i = 0;
            let mut after_swap = 0;
            while after_swap < 20 {
                let mut client: WsClient = node.connect(&format!("fan{l}x{i}")).await?;
                let reply = client.like("like", "live", &format!("k{i}")).await?;
                match reply["type"].as_str() {
                    Some("ack") => acked += 1,
                    _ if reply["code"] == "rejected" => rejected += 1,
                    _ => anyhow::bail!("unexpected reply {reply}"),
                }
                if swapped.load(std::sync::atomic::Ordering::Relaxed) {
                    after_swap += 1;
                }
                i += 1;
            }
            anyhow::Ok((acked, rejected))
        }
    });
    let operator = async {
        // Swap only once the old plugin has demonstrably been refusing likes.
        node.wait_metric("fanfare_likes_total{outcome=\"rejected\"}", |v| v >= 5.0)
            .await?;
        // Drop in a new component and point the manifest at it: the file watcher reloads.
        let good = std::fs::read(plugins.path("validate_basic.wasm"))?;
        plugins.replace_file("validate_v2.wasm", &good)?;
        plugins.write_manifest("[validate]\ncomponent = \"validate_v2.wasm\"\n")?;
        wait_slot(&node, "validate", |s| s["name"] == "validate_v2.wasm").await?;
        swapped.store(true, std::sync::atomic::Ordering::Relaxed);
        anyhow::Ok(())
    };
    let (results, swap) = tokio::join!(futures_util::future::try_join_all(likers), operator);
    swap?;
    let results = results?;
    let acked: u64 = results.iter().map(|r| r.0).sum();
    let rejected: u64 = results.iter().map(|r| r.1).sum();
    assert!(
        rejected > 0,
        "the old plugin rejected likes before the swap"
    );
    assert!(acked >= 80, "the new plugin accepts: {acked} acked");

    // No like lost: the stored count is exactly the acked likes, and listeners converge on it.
    assert_eq!(node.track_count("live").await?, acked);
    for listener in &mut listeners {
        listener
            .recv_until(|f| f["type"] == "likes" && f["count"] == acked)
            .await?;
        listener.send(json!({"type":"ping"})).await?;
        listener.recv_until(|f| f["type"] == "pong").await?;
    }
    assert_eq!(
        node.metric("fanfare_slow_consumer_disconnects_total")
            .await?,
        0.0
    );
    Ok(())
}

#[tokio::test]
async fn broken_components_are_refused_and_the_old_one_keeps_serving() -> anyhow::Result<()> {
    let plugins = PluginDir::new()?;
    let good = "[validate]\ncomponent = \"validate_basic.wasm\"\nconfig = { banned_users = [\"spammer\"] }\n";
    plugins.write_manifest(good)?;
    let (_data, node) = start_with(&plugins).await?;
    let original = slot(&status(&node).await?, "validate")["sha256"].clone();
    let mut spammer = node.connect("spammer").await?;

    // 1. Garbage bytes dropped over the component: the watcher reloads and refuses them.
    let good_bytes = std::fs::read(plugins.path("validate_basic.wasm"))?;
    plugins.replace_file("validate_basic.wasm", b"\0asm garbage")?;
    let refused = wait_slot(&node, "validate", |s| !s["last_refusal"].is_null()).await?;
    assert!(
        refused["last_refusal"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not a valid component")),
        "{refused}"
    );
    assert_eq!(refused["sha256"], original, "old version still active");
    assert_eq!(
        spammer.like("like", "t", "s1").await?["code"],
        "rejected",
        "old plugin still serving"
    );

    // 2. A component for another slot: refused at link time.
    plugins.write_manifest("[validate]\ncomponent = \"shape_json.wasm\"\n")?;
    let (code, report) = node.post("/admin/plugins/reload").await?;
    assert_eq!(code, 200);
    assert!(report.contains("does not fit its slot"), "{report}");

    // 3. A manifest that is not valid: refused as a whole.
    plugins.write_manifest("[validate\ncomponent = 1")?;
    let (code, report) = node.post("/admin/plugins/reload").await?;
    assert_eq!(code, 422, "{report}");
    assert_eq!(spammer.like("like", "t", "s2").await?["code"], "rejected");

    // 4. Restored files and SIGHUP: loaded again, refusal cleared.
    plugins.replace_file("validate_basic.wasm", &good_bytes)?;
    plugins.write_manifest(&good.replace("spammer", "nobody"))?;
    node.signal("HUP")?;
    let healed = wait_slot(&node, "validate", |s| {
        s["last_refusal"].is_null() && s["status"] == "active"
    })
    .await?;
    assert_eq!(healed["sha256"], original);
    assert_eq!(
        spammer.like("like", "t", "s3").await?["type"],
        "ack",
        "new config applied"
    );
    assert!(
        node.metric("fanfare_plugin_reloads_total{slot=\"validate\",outcome=\"refused\"}")
            .await?
            >= 2.0
    );
    Ok(())
}

#[tokio::test]
async fn a_node_refuses_to_start_with_a_broken_manifest() -> anyhow::Result<()> {
    let plugins = PluginDir::new()?;
    plugins.write_manifest("[validate]\ncomponent = \"missing.wasm\"\n")?;
    let data = tempfile::tempdir()?;
    let output = tokio::process::Command::new(fanfare_tests::fanfare_bin())
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .arg("--plugins")
        .arg(plugins.manifest_path())
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("plugins refused") && stderr.contains("missing.wasm"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn a_failing_shaper_falls_back_to_the_built_in_frame() -> anyhow::Result<()> {
    let plugins = PluginDir::new()?;
    let manifest = |mode: &str| {
        format!(
            "[shape]\ncomponent = \"misbehave_shaper.wasm\"\nbudget_ms = 20\nconfig = {{ mode = \"{mode}\" }}\n"
        )
    };
    plugins.write_manifest(&manifest("ok"))?;
    let (_data, node) = start_with(&plugins).await?;
    let mut listener = node.connect("listener").await?;
    listener.subscribe("t").await?;
    let mut liker = node.connect("liker").await?;
    liker.like("like", "t", "k0").await?;
    // Working shaper: its own (smaller) frame.
    let shaped = listener.recv_until(|f| f["type"] == "likes").await?;
    assert_eq!(shaped, json!({"type":"likes","track":"t","count":1}));

    for (n, mode) in ["trap", "loop", "huge"].into_iter().enumerate() {
        plugins.write_manifest(&manifest(mode))?;
        assert_eq!(node.post("/admin/plugins/reload").await?.0, 200);
        let action = if n % 2 == 0 { "unlike" } else { "like" };
        liker.like(action, "t", &format!("k{}", n + 1)).await?;
        let update = listener.recv_until(|f| f["type"] == "likes").await?;
        // The built-in protocol-v1 frame, with the right total.
        assert_eq!(
            update["count"],
            if action == "like" { 1 } else { 0 },
            "{mode}: {update}"
        );
        assert!(
            update["recent"].is_array(),
            "{mode}: built-in frame expected, got {update}"
        );
    }
    // Stats in /admin/plugins are per loaded version; metrics add up across reloads.
    for event in ["trap", "timeout", "invalid_output"] {
        let series = format!("fanfare_plugin_events_total{{slot=\"shape\",event=\"{event}\"}}");
        assert!(node.metric(&series).await? >= 1.0, "{series}");
    }
    let shape = slot(&status(&node).await?, "shape").clone();
    assert!(
        shape["errors"].as_u64() >= Some(1),
        "oversized output counts as an error: {shape}"
    );
    Ok(())
}

/// Runs `fanfare plugin …`; its stdout.
fn plugin_tool(args: &[&str]) -> anyhow::Result<String> {
    let output = std::process::Command::new(fanfare_tests::fanfare_bin())
        .arg("plugin")
        .args(args)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "fanfare plugin {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

#[tokio::test]
async fn only_pinned_and_signed_components_load() -> anyhow::Result<()> {
    let plugins = PluginDir::new()?;
    let key = plugins.path("key.pem").to_string_lossy().to_string();
    let status_of = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out", &key])
        .status()?;
    anyhow::ensure!(status_of.success(), "openssl genpkey failed");
    let public = plugin_tool(&["public-key", "--key", &key])?;
    let component = plugins.path("validate_basic.wasm");
    plugin_tool(&["sign", "--key", &key, &component.to_string_lossy()])?;
    let good = std::fs::read(&component)?;
    let sha256 = {
        let out = std::process::Command::new("sha256sum")
            .arg(&component)
            .output()?;
        String::from_utf8(out.stdout)?
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(sha256.len(), 64, "{sha256}");
    let manifest = |pin: &str| {
        format!(
            "[signing]\npublic_keys = [\"{public}\"]\n[validate]\ncomponent = \"validate_basic.wasm\"\n\
             sha256 = \"{pin}\"\nconfig = {{ banned_users = [\"spammer\"] }}\n"
        )
    };
    plugins.write_manifest(&manifest(&sha256))?;
    let (_data, node) = start_with(&plugins).await?;
    let active = slot(&status(&node).await?, "validate").clone();
    assert_eq!(active["sha256"], sha256.as_str(), "{active}");
    let mut spammer = node.connect("spammer").await?;
    assert_eq!(spammer.like("like", "t", "s1").await?["code"], "rejected");

    // Another component dropped over it: its signature no longer matches; refused, and the
    // signed one keeps serving.
    let other = std::fs::read(plugins.path("misbehave.wasm"))?;
    plugins.replace_file("validate_basic.wasm", &other)?;
    let refused = wait_slot(&node, "validate", |s| !s["last_refusal"].is_null()).await?;
    let reason = refused["last_refusal"]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(
        reason.contains("pin"),
        "the pin is checked first: {refused}"
    );
    assert_eq!(
        refused["sha256"],
        sha256.as_str(),
        "old version still active"
    );
    assert_eq!(spammer.like("like", "t", "s2").await?["code"], "rejected");

    // Without the pin the signature decides: still refused.
    let unpinned = manifest("").replace("sha256 = \"\"\n", "");
    plugins.write_manifest(&unpinned)?;
    let (code, report) = node.post("/admin/plugins/reload").await?;
    assert_eq!(code, 200, "{report}");
    assert!(
        report.contains("not a signature of this component"),
        "{report}"
    );
    assert_eq!(spammer.like("like", "t", "s3").await?["code"], "rejected");

    // The signed bytes back: accepted again.
    plugins.replace_file("validate_basic.wasm", &good)?;
    let (code, report) = node.post("/admin/plugins/reload").await?;
    assert_eq!(code, 200, "{report}");
    assert!(!report.contains("refused"), "{report}");
    Ok(())
}

#[tokio::test]
async fn plugin_check_loads_components_as_a_node_would() -> anyhow::Result<()> {
    let plugins = PluginDir::new()?;
    let run = |args: &[&str]| -> anyhow::Result<(bool, String)> {
        let output = std::process::Command::new(fanfare_tests::fanfare_bin())
            .args(["plugin", "check"])
            .args(args)
            .output()?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        Ok((output.status.success(), text))
    };
    let path = |name: &str| plugins.path(name).to_string_lossy().to_string();

    let (ok, report) = run(&["--slot", "validate", &path("validate_basic.wasm")])?;
    assert!(ok && report.contains("\"outcome\": \"loaded\""), "{report}");
    // A component for another slot does not link against this one's world.
    let (ok, report) = run(&["--slot", "validate", &path("shape_json.wasm")])?;
    assert!(!ok && report.contains("does not fit its slot"), "{report}");
    // A whole manifest, with a pin that does not match.
    plugins.write_manifest(&format!(
        "[validate]\ncomponent = \"validate_basic.wasm\"\nsha256 = \"{}\"\n",
        "0".repeat(64)
    ))?;
    let (ok, report) = run(&[&plugins.manifest_path().to_string_lossy()])?;
    assert!(!ok && report.contains("pin"), "{report}");
    let (ok, report) = run(&["--slot", "nope", &path("validate_basic.wasm")])?;
    assert!(!ok && report.contains("--slot must be"), "{report}");
    Ok(())
}
