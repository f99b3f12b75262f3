//! `qkdctl demo-app`: a demonstration application pair for labs. The master, attached to one
//! KME, repeatedly gets a key (ETSI GS QKD 014 Get key) and sends its ID and a SHA-256 of the
//! key to the slave over TCP; the slave, attached to the other KME, gets the key by ID (Get key
//! with key IDs) and answers whether the digests match. Each side logs every pair; the slave
//! logs `key pair matched` for every matching pair. Keys themselves are never printed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Options of `qkdctl demo-app`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// `master` (gets keys and sends their IDs) or `slave` (gets keys by ID and compares).
    #[arg(long)]
    role: String,
    /// This application's KME, `host:port` of its ETSI HTTPS server.
    #[arg(long)]
    kme: String,
    /// CA certificate that signs the KME's server certificate (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// This application's client certificate (PEM); its CN is the SAE ID.
    #[arg(long)]
    cert: PathBuf,
    /// This application's private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// The other application's SAE ID.
    #[arg(long)]
    peer_sae: String,
    /// Master: the slave's `host:port`; slave: the address to listen on.
    #[arg(long)]
    peer: String,
    /// Master: seconds between key pairs.
    #[arg(long, default_value_t = 1.0)]
    interval_s: f64,
}

fn client(args: &DemoArgs) -> anyhow::Result<reqwest::Client> {
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut identity = read(&args.cert)?;
    identity.push(b'\n');
    identity.extend(read(&args.key)?);
    Ok(reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&read(&args.ca)?)?])
        .identity(reqwest::Identity::from_pem(&identity)?)
        .timeout(Duration::from_secs(10))
        .build()?)
}

fn digest_of(b64: &str) -> anyhow::Result<String> {
    use base64::Engine;
    let key = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(b64)?);
    Ok(hex::encode(Sha256::digest(key.as_slice())))
}

/// Runs the demo application until killed.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        match args.role.as_str() {
            "master" => master(&args).await,
            "slave" => slave(&args).await,
            other => bail!("--role {other:?}: expected master or slave"),
        }
    })
}

async fn master(args: &DemoArgs) -> anyhow::Result<()> {
    let http = client(args)?;
    let url = format!("https://{}/api/v1/keys/{}/enc_keys", args.kme, args.peer_sae);
    let (mut matched, mut failed) = (0u64, 0u64);
    loop {
        tokio::time::sleep(Duration::from_secs_f64(args.interval_s)).await;
        let response = match http.get(&url).send().await {
            Ok(r) => r,
            Err(e) => {
                println!("master: KME unreachable: {e}");
                continue;
            }
        };
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if !status.is_success() {
            println!("master: Get key refused: {status} {}", body["message"].as_str().unwrap_or(""));
            continue;
        }
        let (Some(id), Some(key)) = (body["keys"][0]["key_ID"].as_str(), body["keys"][0]["key"].as_str()) else {
            println!("master: malformed key container");
            continue;
        };
        let digest = digest_of(key)?;
        let verdict = async {
            let stream = tokio::net::TcpStream::connect(&args.peer).await?;
            let (read, mut write) = stream.into_split();
            write.write_all(format!("{id} {digest}\n").as_bytes()).await?;
            let mut line = String::new();
            BufReader::new(read).read_line(&mut line).await?;
            anyhow::Ok(line.trim().to_owned())
        }
        .await;
        match verdict {
            Ok(v) if v == "MATCH" => matched += 1,
            Ok(v) => {
                failed += 1;
                println!("master: slave says {v} for key {id}");
            }
            Err(e) => {
                failed += 1;
                println!("master: slave unreachable: {e}");
            }
        }
        println!("master: key {id} delivered; {matched} pairs matched, {failed} failed");
    }
}

async fn slave(args: &DemoArgs) -> anyhow::Result<()> {
    let http = client(args)?;
    let listener = tokio::net::TcpListener::bind(&args.peer).await.with_context(|| format!("binding {}", args.peer))?;
    println!("slave: listening on {}", args.peer);
    let mut matched = 0u64;
    loop {
        let (stream, _) = listener.accept().await?;
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        if BufReader::new(read).read_line(&mut line).await.is_err() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(id), Some(master_digest)) = (parts.next(), parts.next()) else { continue };
        let url = format!("https://{}/api/v1/keys/{}/dec_keys?key_ID={id}", args.kme, args.peer_sae);
        let verdict = match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => {
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                match body["keys"][0]["key"].as_str().map(digest_of) {
                    Some(Ok(d)) if d == master_digest => "MATCH".to_owned(),
                    Some(_) => "MISMATCH".to_owned(),
                    None => "ERROR malformed key container".to_owned(),
                }
            }
            Ok(r) => format!("ERROR {}", r.status()),
            Err(e) => format!("ERROR {e}"),
        };
        if verdict == "MATCH" {
            matched += 1;
            println!("slave: key pair matched: {id} ({matched} so far)");
        } else {
            println!("slave: key {id}: {verdict}");
        }
        let _ = write.write_all(format!("{verdict}\n").as_bytes()).await;
    }
}
