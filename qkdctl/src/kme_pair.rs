//! `qkdctl keys pair`: two KMEs on loopback with a throw-away PKI and a pool of random units
//! ([`qkd_kme::pair`]), for SAE client development, the API fuzzer (`.ci/schemathesis.sh`) and
//! the key-delivery benchmark (`tests/bench-kme.sh`).

use std::path::PathBuf;

use anyhow::Context;
use qkd_kme::pair::{KME_A, KME_B, KmePair, PairOptions};
use qkd_store::KeyStore;
use tokio_util::sync::CancellationToken;

/// Options of `keys pair`.
#[derive(clap::Args, Debug, Clone)]
pub struct PairArgs {
    /// Directory for the files a client needs (created if missing): ca.crt, client.pem (SAE
    /// sae-a1 at KME A, certificate and key), slave.pem (SAE sae-b1 at KME B), url and peer_url
    /// (the KMEs' base URLs), then `ready` once both serve.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Ready 256-bit units in the pool (the same at both KMEs; each serves half as master).
    #[arg(long, default_value_t = 40_000)]
    pub units: usize,
    /// max_key_per_request of both KMEs.
    #[arg(long, default_value_t = 128)]
    pub max_key_per_request: u32,
    /// requests_per_second_per_sae of both KMEs (429 past it). 0, the default here, serves
    /// without a rate limit, for benchmarks; deployed KMEs default to 200.
    #[arg(long, default_value_t = 0)]
    pub requests_per_second_per_sae: u32,
}

/// Serves the pair until SIGINT or SIGTERM.
pub async fn serve(args: PairArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::remove_file(dir.join("ready"));
    let defaults = PairOptions::default();
    let options = PairOptions {
        n_units: args.units,
        max_key_per_request: args.max_key_per_request,
        abuse: qkd_kme::limits::AbuseLimits {
            requests_per_second_per_sae: args.requests_per_second_per_sae,
            ..defaults.abuse
        },
        ..defaults
    };
    let pair = KmePair::start(&options, dir).await.context("starting the KME pair")?;
    let (master, slave) = (&options.a_saes[0], &options.b_saes[0]);
    pair.pki.write_sae_pem(master, &dir.join("client.pem"))?;
    pair.pki.write_sae_pem(slave, &dir.join("slave.pem"))?;
    let (url, peer_url) =
        (format!("https://127.0.0.1:{}", pair.a.addr.port()), format!("https://127.0.0.1:{}", pair.b.addr.port()));
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("url", &url)?;
    write("peer_url", &peer_url)?;
    write("ready", "")?;
    tracing::warn!("the keys of this KME pair are random test data, not quantum keys: never use them to protect data");
    tracing::info!(
        kme_a = %url, kme_b = %peer_url, units = args.units, dir = %dir.display(),
        "serving {KME_A} (SAE {master}) and {KME_B} (SAE {slave}) until SIGINT or SIGTERM"
    );
    eprintln!(
        "try: qkdctl keys get --kme {url} --ca {d}/ca.crt --cert {d}/client.pem --key {d}/client.pem --slave {slave}",
        d = dir.display()
    );
    let stop = CancellationToken::new();
    common::shutdown_on_signal(stop.clone()).await;
    let left = pair.a.store.summary().map(|s| s.n_keys).unwrap_or(0);
    tracing::info!(ready_units_left = left, "stopping the KME pair");
    pair.stop().await.context("a KME failed")
}
