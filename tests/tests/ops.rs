//! Operating the link: the daemons' `/metrics`, the Grafana dashboard's queries against them,
//! the status page and its data, `qkdctl status`, and what a lab leaves in its logs and
//! `lab.json`. A real `qkdctl lab` (two daemon processes) and real HTTP clients.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use super::*;

/// Metric names of a Prometheus text exposition (histograms as their `_bucket`, `_sum` and
/// `_count` series).
fn metric_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Every `qkd_` metric name in the dashboard's query expressions.
fn dashboard_metrics(dashboard: &serde_json::Value) -> BTreeSet<String> {
    let mut exprs = Vec::new();
    collect_exprs(dashboard, &mut exprs);
    assert!(!exprs.is_empty(), "the dashboard has no queries");
    let mut names = BTreeSet::new();
    for expr in exprs {
        let bytes = expr.as_bytes();
        let mut i = 0;
        while let Some(pos) = expr[i..].find("qkd_") {
            let start = i + pos;
            let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let end = start
                + expr[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(expr.len() - start);
            if boundary {
                names.insert(expr[start..end].to_string());
            }
            i = end;
        }
    }
    names
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// `qkdctl lab` in the background, stopped (SIGTERM, as Ctrl-C) when dropped.
struct LabProcess {
    child: Child,
}

impl LabProcess {
    fn start(dir: &Path, stdout: &Path) -> Self {
        let child = Command::new(workspace_binary("qkdctl"))
            .args(["lab", "--dir"])
            .arg(dir)
            .args(["--duration-s", "600"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(stdout).expect("stdout file"))
            .stderr(std::fs::File::create(stdout.with_extension("err")).expect("stderr file"))
            .spawn()
            .expect("start qkdctl lab");
        Self { child }
    }

    /// SIGTERM, then waits for the lab to stop its daemons and exit.
    fn stop(&mut self) -> std::process::ExitStatus {
        Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().expect("kill");
        self.child.wait().expect("wait for the lab")
    }
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

async fn get_text(client: &reqwest::Client, url: &str) -> Option<String> {
    let response = client.get(url).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.text().await.ok()
}

/// A running lab's dashboards and pages: every metric the Grafana dashboard queries exists in
/// the daemons' scrapes; `/metrics` counts ETSI requests; the status page and its data answer;
/// `qkdctl status` prints one line per daemon (and JSON); a stopped lab says so in `lab.json`,
/// and its logs have no colour codes and no failure-looking warnings from a normal start and stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_lab_serves_the_dashboards_metrics_status_page_and_qkdctl_status() {
    init();
    let root = TempDir::new("ops-lab");
    let dir = root.0.join("lab");
    let mut lab = LabProcess::start(&dir, &root.0.join("lab.out"));
    let lab_json = |dir: &Path| -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(dir.join("lab.json")).ok()?).ok()
    };
    let info = wait_for("lab.json of the running lab", Duration::from_secs(60), || {
        lab_json(&dir).filter(|v| v["running"] == true)
    })
    .await;
    let health: Vec<String> = info["daemons"]
        .as_array()
        .expect("lab.json lists the daemons")
        .iter()
        .map(|d| d["health_addr"].as_str().expect("health_addr").to_string())
        .collect();
    assert_eq!(health.len(), 2);

    // One ETSI request at each KME (Get status by each lab application), for the request metrics.
    let ca = std::fs::read(info["ca_cert"].as_str().unwrap()).unwrap();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    for (sae, kme, slave) in [(0, 0, "app-b"), (1, 1, "app-a")] {
        let entry = &info["saes"][sae];
        let mut pem = std::fs::read(entry["cert"].as_str().unwrap()).unwrap();
        pem.extend(std::fs::read(entry["key"].as_str().unwrap()).unwrap());
        let sae_client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
            .identity(reqwest::Identity::from_pem(&pem).unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let url = format!("https://{}/api/v1/keys/{slave}/status", info["kmes"][kme]["etsi_addr"].as_str().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match sae_client.get(&url).send().await {
                Ok(r) => {
                    assert_eq!(r.status(), 200, "{url}");
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "{url}: {}", error_chain(&e)),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The dashboard's metrics all exist once the link has committed blocks and sampled twice.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/qkd-link.json"))
            .expect("deploy/grafana/qkd-link.json"),
    )
    .expect("the dashboard is JSON");
    let wanted = dashboard_metrics(&dashboard);
    assert!(wanted.len() >= 15, "few metrics in the dashboard: {wanted:?}");
    let mut scraped = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        scraped.clear();
        let mut texts = Vec::new();
        for addr in &health {
            if let Some(text) = get_text(&client, &format!("http://{addr}/metrics")).await {
                scraped.extend(metric_names(&text));
                texts.push(text);
            }
        }
        let missing: Vec<_> = wanted.difference(&scraped).collect();
        if missing.is_empty() && texts.len() == 2 {
            // Each daemon's scrape carries its own node label only, and no key material
            // (nothing but names, labels and numbers).
            for (text, node) in texts.iter().zip(["alice", "bob"]) {
                assert!(text.contains(&format!("node=\"{node}\"")), "{node}'s scrape:\n{text}");
                let other = if node == "alice" { "bob" } else { "alice" };
                assert!(!text.contains(&format!("node=\"{other}\"")), "{node}'s scrape shows {other}:\n{text}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard queries metrics no daemon exports: {missing:?}\nscraped: {scraped:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        scraped.contains("qkd_etsi_requests_total") && scraped.contains("qkd_etsi_request_duration_seconds_bucket"),
        "{scraped:?}"
    );

    // The status page and its data.
    for addr in &health {
        let page = get_text(&client, &format!("http://{addr}/")).await.expect("status page");
        assert!(page.contains("status/history.json") && page.contains("<svg"), "{page}");
        let history: serde_json::Value =
            serde_json::from_str(&get_text(&client, &format!("http://{addr}/status/history.json")).await.unwrap())
                .unwrap();
        let samples = history["samples"].as_array().expect("samples");
        assert!(samples.len() >= 2, "{history}");
        assert!(samples.iter().any(|s| s["qber_z"].as_f64().is_some_and(|q| q > 0.0 && q < 0.11)), "{history}");
        assert!(samples.iter().any(|s| s["auth_pool_bits"].as_u64().is_some_and(|b| b > 0)), "{history}");
        assert_eq!(history["now"]["link_up"], true, "{history}");
    }

    // qkdctl status: one line per daemon, and JSON.
    let qkdctl = workspace_binary("qkdctl");
    let out = Command::new(&qkdctl).args(["status", "--dir"]).arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    for (line, node) in lines.iter().zip(["alice", "bob"]) {
        assert!(line.starts_with(node) && line.contains("linked") && line.contains("QBER Z "), "{text}");
        assert!(line.contains("bit/s") && line.contains("auth pool ") && line.contains(" bits"), "{text}");
    }
    let out =
        Command::new(&qkdctl).args(["status", "--json", "--addr", &health[1], "--addr", &health[0]]).output().unwrap();
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = json.as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["node"], "bob");
    assert_eq!(items[1]["node"], "alice");
    assert!(items[0]["qber_z"].as_f64().is_some() && items[0]["auth_pool_bits"].as_u64().is_some(), "{json}");
    // An address nobody serves: its line says so, and the exit status is 1.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let out = Command::new(&qkdctl).args(["status", "--addr", &closed]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("unreachable"));

    // A normal stop: lab.json says when; the logs have plain text and no failure-looking lines.
    assert!(lab.stop().success(), "the lab failed: {}", std::fs::read_to_string(root.0.join("lab.out")).unwrap());
    let stopped = lab_json(&dir).unwrap();
    assert_eq!(stopped["running"], false);
    assert!(stopped["stopped_unix_s"].as_u64().is_some(), "{stopped}");
    for log in ["alice.log", "bob.log"] {
        let text = std::fs::read_to_string(dir.join("logs").join(log)).unwrap();
        assert!(!text.contains('\u{1b}'), "{log} has ANSI escape codes");
        for bad in ["Broken pipe", "Connection refused", "ERROR"] {
            assert!(!text.contains(bad), "{log} says {bad:?} in a normal run:\n{text}");
        }
    }
    let out = std::fs::read_to_string(root.0.join("lab.out")).unwrap();
    assert!(out.contains("key units") && out.contains("status pages"), "{out}");
}

/// Two daemons in one process keep separate metrics: each recorder is its daemon's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_in_one_process_keep_separate_metrics() {
    let lab = Lab::new("ops-metrics");
    let (grpc, fibre) = bind_pair().await;
    let (grpc_addr, fibre_addr) = (grpc.local_addr().unwrap(), fibre.local_addr().unwrap());
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (health_a, health_b) = (free(), free());
    let mut alice_cfg = lab.alice_config(grpc_addr, fibre_addr);
    alice_cfg.health_listen = Some(health_a);
    let mut bob_cfg = lab.bob_config(grpc_addr, fibre_addr);
    bob_cfg.health_listen = Some(health_b);
    let alice = spawn_alice_with(&lab, alice_cfg, grpc, Some(fibre));
    let bob = spawn_bob_with(&lab, bob_cfg);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (a, b) = loop {
        let a = get_text(&client, &format!("http://{health_a}/metrics")).await.unwrap_or_default();
        let b = get_text(&client, &format!("http://{health_b}/metrics")).await.unwrap_or_default();
        let committed = |t: &str| {
            t.lines().any(|l| l.starts_with("qkd_blocks_total{") && l.contains("committed") && !l.ends_with(" 0"))
        };
        if committed(&a) && committed(&b) {
            break (a, b);
        }
        assert!(Instant::now() < deadline, "no committed block in the metrics:\n{a}\n{b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(a.contains("role=\"alice\"") && !a.contains("role=\"bob\""), "{a}");
    assert!(b.contains("role=\"bob\"") && !b.contains("role=\"alice\""), "{b}");
    assert!(b.contains("qkd_detections_total{") && !a.contains("qkd_detections_total{"));
    assert!(a.contains("# HELP qkd_qber_ratio") && a.contains("# TYPE qkd_blocks_total counter"), "{a}");
    bob.stop().await.unwrap();
    alice.stop().await.unwrap();
}
