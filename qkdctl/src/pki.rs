//! `qkdctl pki`: the PKI of a deployment (layout and profiles: `qkd_tls::pki`). Two issuing CAs
//! (nodes; applications) whose private keys stay in `DIR/ca/`, which is never installed on a
//! node; a bundle per node (`DIR/nodes/NAME/`: its certificate and key, the trust anchors and
//! the revocation lists) and per application (`DIR/apps/SAE_ID/`). Certificates are valid 365
//! days by default; `renew` reissues them, `revoke` and `crl` maintain the revocation lists
//! (RFC 5280) that the daemons read again whenever the files change. Operators with their own
//! CA skip `init` and point the `[tls]` and `[kme.tls]` sections at their files.

use std::path::PathBuf;

use anyhow::{Context, bail};
use qkd_tls::ca::{DEFAULT_CA_DAYS, DEFAULT_CERT_DAYS};
use qkd_tls::pki::{InitOptions, Kind, Pki, REASONS, Record};

/// `qkdctl pki` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum PkiCommand {
    /// Create the node CA, the application CA, their CRLs, and the bundles of the Alice and Bob
    /// nodes (DIR/nodes/alice/, DIR/nodes/bob/) and of the SAEs asked for (DIR/apps/SAE_ID/).
    Init {
        /// PKI directory (created; an existing CA is never overwritten).
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// DNS names (and IP addresses) for Alice's certificate, comma-separated; the first is
        /// the name Bob expects (classical.alice_name).
        #[arg(long, value_delimiter = ',', default_value = "alice,localhost,127.0.0.1")]
        alice_names: Vec<String>,
        /// DNS names (and IP addresses) for Bob's certificate, comma-separated; the first is the
        /// name Alice expects (classical.peer_name).
        #[arg(long, value_delimiter = ',', default_value = "bob,localhost,127.0.0.1")]
        bob_names: Vec<String>,
        /// Common name of the node CA.
        #[arg(long, default_value = "QKD node CA")]
        ca_name: String,
        /// Common name of the application (SAE) CA.
        #[arg(long, default_value = "QKD application CA")]
        apps_ca_name: String,
        /// Validity of the CAs, days.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        ca_days: u32,
        /// Validity of the node and SAE certificates, days.
        #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
        days: u32,
        /// Name constraint of the node CA (RFC 5280, 4.2.1.10): node DNS names must be this
        /// domain or under it (repeatable; IP addresses are not constrained).
        #[arg(long = "permit-dns", value_name = "DOMAIN")]
        permit_dns: Vec<String>,
        /// Also issue an application (SAE) certificate with this ID (repeatable).
        #[arg(long = "sae", value_name = "SAE_ID")]
        saes: Vec<String>,
        /// Do nothing when DIR already holds a PKI (for one-shot init containers).
        #[arg(long)]
        keep_existing: bool,
    },
    /// Issue node NAME's certificate and write its bundle DIR/nodes/NAME/.
    IssueNode {
        /// The node's name (common name and bundle directory).
        name: String,
        /// DNS names and IP addresses of the node, comma-separated (the peer checks one).
        #[arg(long, value_delimiter = ',', required = true)]
        names: Vec<String>,
        /// PKI directory.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Validity, days.
        #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
        days: u32,
    },
    /// Issue an application (SAE) client certificate with common name SAE_ID and write its
    /// bundle DIR/apps/SAE_ID/ (sae.crt, sae.key, nodes-ca.crt to verify the KMEs).
    IssueSae {
        /// The SAE ID.
        name: String,
        /// PKI directory.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Validity, days.
        #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
        days: u32,
    },
    /// Reissue NAME's certificate with the same names for another DAYS days (same key unless
    /// --new-key, so pins stay valid); the bundle is rewritten, copy it to the host again.
    Renew {
        /// Node name (or SAE ID with --sae).
        name: String,
        /// NAME is an SAE ID.
        #[arg(long)]
        sae: bool,
        /// PKI directory.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Validity, days.
        #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
        days: u32,
        /// Make a new private key (peers that pin the old one must be updated).
        #[arg(long)]
        new_key: bool,
        /// Revoke the old certificate (reason superseded) instead of letting it expire.
        #[arg(long)]
        revoke_old: bool,
    },
    /// Revoke NAME's current certificate (or the one with --serial) and rewrite the CRLs in
    /// DIR/ca/ and in every node bundle; copy them to the nodes, which reload them.
    Revoke {
        /// Node name (or SAE ID with --sae); omit with --serial.
        name: Option<String>,
        /// NAME is an SAE ID.
        #[arg(long)]
        sae: bool,
        /// Serial number (hex, from `qkdctl pki list`) of the certificate to revoke.
        #[arg(long)]
        serial: Option<String>,
        /// RFC 5280 reason: unspecified, key-compromise, ca-compromise, affiliation-changed,
        /// superseded, cessation-of-operation.
        #[arg(long, default_value = "unspecified")]
        reason: String,
        /// PKI directory.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
    /// Write fresh CRLs (new number and dates) into DIR/ca/ and every node bundle.
    Crl {
        /// PKI directory.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Days until the CRLs' nextUpdate (kept for later refreshes) [default: the last value, 30].
        #[arg(long)]
        next_update_days: Option<u32>,
    },
    /// List every certificate issued: kind, name, serial, expiry, status.
    List {
        /// PKI directory.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a certificate: subject, issuer, serial, validity, names, key usages, status and the
    /// SHA-256 of its public key (the value of `peer_spki_sha256` to pin it).
    Show {
        /// Node name (or SAE ID with --sae), or a certificate file with --file.
        name: Option<String>,
        /// NAME is an SAE ID.
        #[arg(long)]
        sae: bool,
        /// A PEM certificate file to show instead.
        #[arg(long)]
        file: Option<PathBuf>,
        /// PKI directory.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
}

fn kind(sae: bool) -> Kind {
    if sae { Kind::Sae } else { Kind::Node }
}

fn date(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(|t| format!("{}-{:02}-{:02} {:02}:{:02}Z", t.year(), t.month() as u8, t.day(), t.hour(), t.minute()))
        .unwrap_or_else(|_| unix.to_string())
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn print_issued(pki: &Pki, record: &Record) {
    let dir = pki.bundle_dir(record.kind, &record.name);
    println!(
        "{} {}: serial {}, valid until {}, bundle {}",
        record.kind,
        record.name,
        record.serial,
        date(record.not_after),
        dir.display()
    );
}

/// Runs a `qkdctl pki` subcommand.
pub fn run(cmd: PkiCommand) -> anyhow::Result<()> {
    match cmd {
        PkiCommand::Init {
            dir,
            alice_names,
            bob_names,
            ca_name,
            apps_ca_name,
            ca_days,
            days,
            permit_dns,
            saes,
            keep_existing,
        } => {
            if keep_existing && Pki::exists(&dir) {
                println!("{} already holds a PKI; keeping it", dir.display());
                return Ok(());
            }
            let options = InitOptions {
                nodes_ca_name: ca_name,
                apps_ca_name,
                ca_days,
                days,
                permitted_dns: permit_dns,
                nodes: vec![("alice".into(), alice_names), ("bob".into(), bob_names)],
                saes,
            };
            let pki = Pki::init(&dir, &options).with_context(|| format!("creating the PKI in {}", dir.display()))?;
            println!("CAs and revocation lists in {} (keep this directory offline)", pki.ca_dir().display());
            for record in pki.records()? {
                print_issued(&pki, &record);
            }
            println!("install {}/nodes/NAME/ on each node (it holds no CA key)", dir.display());
            Ok(())
        }
        PkiCommand::IssueNode { name, names, dir, days } => {
            let pki = Pki::open(&dir)?;
            print_issued(&pki, &pki.issue_node(&name, &names, days)?);
            Ok(())
        }
        PkiCommand::IssueSae { name, dir, days } => {
            let pki = Pki::open(&dir)?;
            print_issued(&pki, &pki.issue_sae(&name, days)?);
            Ok(())
        }
        PkiCommand::Renew { name, sae, dir, days, new_key, revoke_old } => {
            let pki = Pki::open(&dir)?;
            let record = pki.renew(kind(sae), &name, days, new_key, revoke_old)?;
            print_issued(&pki, &record);
            if revoke_old {
                println!("the old certificate is revoked; copy the CRLs to the nodes");
            }
            Ok(())
        }
        PkiCommand::Revoke { name, sae, serial, reason, dir } => {
            let pki = Pki::open(&dir)?;
            if !REASONS.contains(&reason.as_str()) {
                bail!("unknown reason {reason:?}; one of {}", REASONS.join(", "));
            }
            let record = match (name, serial) {
                (_, Some(serial)) => pki.revoke_serial(&serial, &reason)?,
                (Some(name), None) => pki.revoke(kind(sae), &name, &reason)?,
                (None, None) => bail!("name the certificate to revoke (NAME, or --serial)"),
            };
            println!(
                "revoked {} {} (serial {}, reason {reason}); CRLs rewritten in {} and the node bundles: \
                 copy nodes.crl and apps.crl to every node",
                record.kind,
                record.name,
                record.serial,
                pki.ca_dir().display()
            );
            Ok(())
        }
        PkiCommand::Crl { dir, next_update_days } => {
            let pki = Pki::open(&dir)?;
            pki.refresh_crls(next_update_days)?;
            println!("CRLs rewritten in {} and the node bundles", pki.ca_dir().display());
            Ok(())
        }
        PkiCommand::List { dir, json } => {
            let pki = Pki::open(&dir)?;
            let records = pki.records()?;
            let now = now();
            if json {
                let rows: Vec<serde_json::Value> = records
                    .iter()
                    .map(|r| {
                        let mut v = serde_json::to_value(r).expect("records serialize");
                        v["status"] = r.status(now).into();
                        v
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            println!("{:<5} {:<20} {:<34} {:<18} status", "kind", "name", "serial", "not after");
            for r in &records {
                println!(
                    "{:<5} {:<20} {:<34} {:<18} {}",
                    r.kind.to_string(),
                    r.name,
                    r.serial,
                    date(r.not_after),
                    r.status(now)
                );
            }
            Ok(())
        }
        PkiCommand::Show { name, sae, file, dir } => {
            let (path, record) = match (file, name) {
                (Some(file), _) => (file, None),
                (None, Some(name)) => {
                    let pki = Pki::open(&dir)?;
                    let record = pki.current(kind(sae), &name)?;
                    (pki.cert_path(kind(sae), &name), Some(record))
                }
                (None, None) => bail!("name the certificate to show (NAME, or --file)"),
            };
            let pem = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            print!("{}", qkd_tls::ca::show(&pem)?);
            if let Some(record) = record {
                println!("status:         {}", record.status(now()));
                if let (Some(at), Some(reason)) = (record.revoked_at, record.reason.as_deref()) {
                    println!("revoked:        {} ({reason})", date(at));
                }
            }
            Ok(())
        }
    }
}
