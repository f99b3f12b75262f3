//! `qkdctl keys ...`: an ETSI GS QKD 014 client (an SAE) for a KME, with mutual TLS.
//!
//! `status`, `get` and `get-by-id` print the KME's JSON answer on stdout (the keys included:
//! fetching them is this tool's purpose). A non-200 answer is printed too, and the command
//! fails. `bench` measures Get key plus Get key with key IDs across two KMEs; `pair` serves two
//! KMEs with test units to run them against.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// The `keys` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum KeysCommand {
    /// Get status: the key pool of the pair (this SAE as master, --slave as slave).
    Status {
        /// The KME and this SAE's TLS material.
        #[command(flatten)]
        connection: Connection,
        /// The slave SAE's ID.
        #[arg(long)]
        slave: String,
    },
    /// Get key: new keys for the pair (this SAE as master, --slave as slave). Uses GET when only
    /// --number/--size are given (or nothing), POST otherwise or with --post.
    Get {
        /// The KME and this SAE's TLS material.
        #[command(flatten)]
        connection: Connection,
        /// The slave SAE's ID.
        #[arg(long)]
        slave: String,
        /// Number of keys (KME default: 1).
        #[arg(long)]
        number: Option<u32>,
        /// Key size, bits (KME default: its key_size).
        #[arg(long)]
        size: Option<u32>,
        /// Additional slave SAE IDs (multicast; repeat the option).
        #[arg(long = "additional-slave", value_name = "SAE_ID")]
        additional_slaves: Vec<String>,
        /// Send a POST with a JSON body even for a simple request.
        #[arg(long)]
        post: bool,
    },
    /// Get key with key IDs: the keys --key-id that the master --master obtained for this SAE.
    /// One ID uses GET, several use POST.
    GetById {
        /// The KME and this SAE's TLS material.
        #[command(flatten)]
        connection: Connection,
        /// The master SAE's ID.
        #[arg(long)]
        master: String,
        /// A key ID (UUID); repeat the option for several keys.
        #[arg(long = "key-id", value_name = "UUID", required = true)]
        key_ids: Vec<String>,
        /// Send a POST even for one key ID.
        #[arg(long)]
        post: bool,
    },
    /// Benchmark: --clients concurrent loops of Get key (1 key) at --kme as --master, then Get
    /// key with key IDs at --peer-kme as --slave, for --duration-s. Prints requests per second
    /// and the 50th and 99th latency percentiles of each call.
    Bench(BenchArgs),
    /// Serve two KMEs on loopback with a throw-away PKI and a pool of random test units (not
    /// quantum keys), for SAE client development, API fuzzing and `keys bench`; writes the
    /// client's files into --dir and serves until SIGINT or SIGTERM.
    Pair(crate::kme_pair::PairArgs),
}

/// Where the KME is and how this SAE authenticates.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    /// The KME: `https://host:port` or `host:port`.
    #[arg(long, value_name = "URL")]
    pub kme: String,
    /// This SAE's certificate, PEM (its SAE ID is read from it by the KME).
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// This SAE's private key, PEM.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// The CA certificate that signs the KME's server certificate, PEM.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
}

/// Options of `keys bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// The master's KME: `https://host:port` or `host:port`.
    #[arg(long, value_name = "URL")]
    pub kme: String,
    /// The slave's KME.
    #[arg(long, value_name = "URL")]
    pub peer_kme: String,
    /// The CA certificate that signs both KMEs' server certificates, PEM.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// The master SAE's certificate, PEM.
    #[arg(long, value_name = "FILE")]
    pub master_cert: PathBuf,
    /// The master SAE's private key, PEM.
    #[arg(long, value_name = "FILE")]
    pub master_key: PathBuf,
    /// The slave SAE's certificate, PEM.
    #[arg(long, value_name = "FILE")]
    pub slave_cert: PathBuf,
    /// The slave SAE's private key, PEM.
    #[arg(long, value_name = "FILE")]
    pub slave_key: PathBuf,
    /// The master SAE's ID.
    #[arg(long)]
    pub master: String,
    /// The slave SAE's ID.
    #[arg(long)]
    pub slave: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Duration of the run, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,
    /// Key size, bits.
    #[arg(long, default_value_t = 256)]
    pub size: u32,
}

/// Runs a `keys` subcommand on its own tokio runtime.
pub fn run(command: KeysCommand) -> anyhow::Result<()> {
    qkd_tls::install_crypto_provider();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        match command {
            KeysCommand::Status { connection, slave } => {
                let client = Sae::new(&connection.kme, &connection.ca, &connection.cert, &connection.key)?;
                print_answer(client.get(&client.url(&slave, "status")).await?)
            }
            KeysCommand::Get { connection, slave, number, size, additional_slaves, post } => {
                let client = Sae::new(&connection.kme, &connection.ca, &connection.cert, &connection.key)?;
                let url = client.url(&slave, "enc_keys");
                let answer = if post || !additional_slaves.is_empty() {
                    let mut body = serde_json::Map::new();
                    if let Some(number) = number {
                        body.insert("number".into(), json!(number));
                    }
                    if let Some(size) = size {
                        body.insert("size".into(), json!(size));
                    }
                    if !additional_slaves.is_empty() {
                        body.insert("additional_slave_SAE_IDs".into(), json!(additional_slaves));
                    }
                    client.post(&url, &Value::Object(body)).await?
                } else {
                    let query: Vec<String> = [number.map(|n| format!("number={n}")), size.map(|s| format!("size={s}"))]
                        .into_iter()
                        .flatten()
                        .collect();
                    let url = if query.is_empty() { url } else { format!("{url}?{}", query.join("&")) };
                    client.get(&url).await?
                };
                print_answer(answer)
            }
            KeysCommand::GetById { connection, master, key_ids, post } => {
                let client = Sae::new(&connection.kme, &connection.ca, &connection.cert, &connection.key)?;
                let url = client.url(&master, "dec_keys");
                let answer = match key_ids.as_slice() {
                    [one] if !post => client.get(&format!("{url}?key_ID={}", percent_encode(one))).await?,
                    _ => client.post(&url, &key_ids_body(&key_ids)).await?,
                };
                print_answer(answer)
            }
            KeysCommand::Bench(args) => bench(args).await,
            KeysCommand::Pair(args) => crate::kme_pair::serve(args).await,
        }
    })
}

/// An HTTPS client presenting an SAE's certificate to one KME.
struct Sae {
    http: reqwest::Client,
    base: String,
}

/// A KME's answer: the HTTP status code and the JSON body.
struct Answer {
    code: u16,
    body: Value,
}

impl Sae {
    fn new(kme: &str, ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let read = |path: &Path| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
        let ca = reqwest::Certificate::from_pem(&read(ca)?).context("CA certificate")?;
        let mut identity = read(cert)?;
        identity.push(b'\n');
        identity.extend_from_slice(&read(key)?);
        let identity = reqwest::Identity::from_pem(&identity).context("SAE certificate and key")?;
        let http = reqwest::Client::builder()
            .tls_certs_only([ca])
            .identity(identity)
            .timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTPS client")?;
        let base = if kme.starts_with("https://") {
            kme.trim_end_matches('/').to_owned()
        } else if kme.contains("://") {
            bail!("--kme {kme:?}: the KME is served over https only");
        } else {
            format!("https://{kme}")
        };
        Ok(Self { http, base })
    }

    fn url(&self, sae_id: &str, endpoint: &str) -> String {
        format!("{}/api/v1/keys/{}/{endpoint}", self.base, percent_encode(sae_id))
    }

    async fn get(&self, url: &str) -> anyhow::Result<Answer> {
        self.send(self.http.get(url)).await
    }

    async fn post(&self, url: &str, body: &Value) -> anyhow::Result<Answer> {
        self.send(self.http.post(url).json(body)).await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Answer> {
        let response = request.send().await.context("request to the KME failed (TLS handshake or connection)")?;
        let code = response.status().as_u16();
        let text = response.text().await.context("reading the KME's answer")?;
        let body = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "message": text }));
        Ok(Answer { code, body })
    }
}

fn key_ids_body(key_ids: &[String]) -> Value {
    json!({ "key_IDs": key_ids.iter().map(|id| json!({ "key_ID": id })).collect::<Vec<_>>() })
}

/// Prints the answer as JSON; fails on anything but 200.
fn print_answer(answer: Answer) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(&answer.body)?);
    if answer.code != 200 {
        let message = answer.body.get("message").and_then(Value::as_str).unwrap_or("(no message)");
        bail!("the KME answered {}: {message}", answer.code);
    }
    Ok(())
}

/// Percent-encodes every byte outside the URL's unreserved set (SAE IDs in paths, key IDs).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Latencies of one kind of call, microseconds.
#[derive(Default)]
struct Latencies(Vec<u64>);

impl Latencies {
    fn percentile(&mut self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.sort_unstable();
        let rank = ((p / 100.0) * (self.0.len() - 1) as f64).round() as usize;
        Duration::from_micros(self.0[rank.min(self.0.len() - 1)])
    }
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.duration_s.is_nan() || args.duration_s <= 0.0 {
        bail!("--clients and --duration-s must be positive");
    }
    let master = Arc::new(Sae::new(&args.kme, &args.ca, &args.master_cert, &args.master_key)?);
    let slave = Arc::new(Sae::new(&args.peer_kme, &args.ca, &args.slave_cert, &args.slave_key)?);
    let enc_url = format!("{}?number=1&size={}", master.url(&args.slave, "enc_keys"), args.size);
    let dec_url = slave.url(&args.master, "dec_keys");
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration_s);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        let (master, slave, enc_url, dec_url) = (master.clone(), slave.clone(), enc_url.clone(), dec_url.clone());
        tasks.push(tokio::spawn(async move {
            let (mut enc, mut dec, mut errors) = (Latencies::default(), Latencies::default(), 0u64);
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let answer = master.get(&enc_url).await?;
                let key_id = match (answer.code, answer.body.pointer("/keys/0/key_ID").and_then(Value::as_str)) {
                    (200, Some(id)) => id.to_owned(),
                    _ => {
                        errors += 1;
                        continue;
                    }
                };
                enc.0.push(t0.elapsed().as_micros() as u64);
                let t1 = Instant::now();
                let answer = slave.get(&format!("{dec_url}?key_ID={key_id}")).await?;
                if answer.code == 200 {
                    dec.0.push(t1.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            anyhow::Ok((enc, dec, errors))
        }));
    }
    let (mut enc, mut dec, mut errors) = (Latencies::default(), Latencies::default(), 0);
    for task in tasks {
        let (e, d, n) = task.await.context("bench client panicked")??;
        enc.0.extend(e.0);
        dec.0.extend(d.0);
        errors += n;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let report = json!({
        "clients": args.clients,
        "duration_s": elapsed,
        "key_size": args.size,
        "errors": errors,
        "enc_keys": {
            "requests": enc.0.len(),
            "requests_per_s": enc.0.len() as f64 / elapsed,
            "p50_ms": enc.percentile(50.0).as_secs_f64() * 1e3,
            "p99_ms": enc.percentile(99.0).as_secs_f64() * 1e3,
        },
        "dec_keys": {
            "requests": dec.0.len(),
            "requests_per_s": dec.0.len() as f64 / elapsed,
            "p50_ms": dec.percentile(50.0).as_secs_f64() * 1e3,
            "p99_ms": dec.percentile(99.0).as_secs_f64() * 1e3,
        },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sae_ids_are_percent_encoded() {
        assert_eq!(percent_encode("sae-1_a.b~"), "sae-1_a.b~");
        assert_eq!(percent_encode("SAE b/3 é"), "SAE%20b%2F3%20%C3%A9");
    }

    #[test]
    fn key_ids_body_has_the_standard_shape() {
        assert_eq!(key_ids_body(&["a".into()]), json!({"key_IDs": [{"key_ID": "a"}]}));
    }

    #[test]
    fn commands_parse() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            command: KeysCommand,
        }
        let common = ["--kme", "kme:8443", "--cert", "c", "--key", "k", "--ca", "ca"];
        let cli =
            Cli::try_parse_from(["keys", "get", "--slave", "s", "--number", "3"].into_iter().chain(common)).unwrap();
        assert!(matches!(cli.command, KeysCommand::Get { number: Some(3), .. }));
        let cli = Cli::try_parse_from(
            ["keys", "get-by-id", "--master", "m", "--key-id", "x", "--key-id", "y"].into_iter().chain(common),
        )
        .unwrap();
        assert!(matches!(cli.command, KeysCommand::GetById { ref key_ids, .. } if key_ids.len() == 2));
        assert!(Cli::try_parse_from(["keys", "get-by-id", "--master", "m"].into_iter().chain(common)).is_err());
    }
}
