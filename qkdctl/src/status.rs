//! `qkdctl status`: one line per daemon (state, QBER, key rate, authentication pool, store),
//! read from the daemons' health listeners (`GET /status.json`), at addresses given by flags or
//! listed in a lab directory's `lab.json`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use common::telemetry::NodeStatus;

/// Options of `qkdctl status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// A daemon's health listener, HOST:PORT (its `health_listen`); repeat for each daemon.
    /// Without it, the daemons of the lab in --dir.
    #[arg(long = "addr", value_name = "HOST:PORT")]
    addrs: Vec<String>,
    /// A `qkdctl lab` directory: its `lab.json` lists the daemons' health listeners.
    #[arg(long, default_value = "lab", conflicts_with = "addrs")]
    dir: PathBuf,
    /// Print JSON (an array: each daemon's state as `/status.json` gives it, or its address
    /// and the error) instead of text.
    #[arg(long)]
    json: bool,
}

/// Exit status: 0 when every daemon answered, 1 otherwise.
pub fn run(args: StatusArgs) -> anyhow::Result<std::process::ExitCode> {
    let targets = if args.addrs.is_empty() { lab_daemons(&args.dir)? } else { args.addrs.clone() };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).build()?;
    let answers: Vec<(String, Result<NodeStatus, String>)> = runtime.block_on(async {
        let mut out = Vec::new();
        for addr in &targets {
            out.push((addr.clone(), fetch(&client, addr).await));
        }
        out
    });
    let all_ok = answers.iter().all(|(_, a)| a.is_ok());
    if args.json {
        let items: Vec<serde_json::Value> = answers
            .iter()
            .map(|(addr, answer)| match answer {
                Ok(status) => {
                    let mut v = serde_json::to_value(status).unwrap_or_default();
                    v["addr"] = serde_json::json!(addr);
                    v
                }
                Err(e) => serde_json::json!({ "addr": addr, "error": e }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
    } else {
        for (addr, answer) in &answers {
            match answer {
                Ok(status) => println!("{}", line(status)),
                Err(e) => println!("{addr:<21} unreachable: {e}"),
            }
        }
    }
    Ok(if all_ok { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
}

/// The health listeners `lab.json` lists.
fn lab_daemons(dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let path = dir.join("lab.json");
    let lab: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path)
            .with_context(|| format!("reading {} (is there a lab? or give --addr)", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    let addrs: Vec<String> = lab["daemons"]
        .as_array()
        .map(|d| d.iter().filter_map(|d| d["health_addr"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    anyhow::ensure!(
        !addrs.is_empty(),
        "{} lists no daemon health listeners (a lab made by an older qkdctl); give --addr HOST:PORT",
        path.display()
    );
    if lab["running"].as_bool() == Some(false) {
        eprintln!("note: {} says the lab is stopped", path.display());
    }
    Ok(addrs)
}

async fn fetch(client: &reqwest::Client, addr: &str) -> Result<NodeStatus, String> {
    let url = format!("http://{addr}/status.json");
    let response = client.get(&url).send().await.map_err(|e| format!("{url}: {:#}", anyhow::Error::new(e)))?;
    if !response.status().is_success() {
        return Err(format!("{url}: HTTP {}", response.status()));
    }
    response.json::<NodeStatus>().await.map_err(|e| format!("{url}: {e}"))
}

/// `alice  linked | QBER Z 3.74% X 3.60% | secret key 8018 bit/s | auth pool 9984 bits | store 412 units ready`
fn line(s: &NodeStatus) -> String {
    let pct = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{:.2}%", 100.0 * x));
    let n = &s.snapshot;
    format!(
        "{:<6} {:<20} | QBER Z {} X {} | secret key {} | auth pool {} | store {}",
        s.node,
        n.state,
        pct(n.qber_z),
        pct(n.qber_x),
        s.secret_key_rate_bps.map_or("-".to_string(), |r| format!("{r:.0} bit/s")),
        n.auth_pool_bits.map_or("-".to_string(), |b| format!("{b} bits")),
        s.store.map_or("-".to_string(), |l| format!("{} units ready", l.ready_units)),
    )
}
