//! `qkdctl pki`: certificates for a deployment. A CA, the two KMEs' node certificates (TLS
//! server and client use, for the classical channel, the KME-to-KME channel and the key-delivery
//! API) and application (SAE) certificates whose common name is the SAE ID. Private keys are
//! written with mode 0600. Operators with their own CA skip `init` and point the configs at
//! their files.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use qkd_tls::{CertAuthority, write_issued, write_pem};

/// `qkdctl pki` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum PkiCommand {
    /// Create a CA and the certificates of the Alice and Bob KMEs in DIR.
    Init {
        /// Output directory (created; existing files are never overwritten).
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
        /// Common name of the CA.
        #[arg(long, default_value = "QKD link CA")]
        ca_name: String,
        /// Also issue an application (SAE) certificate with this ID (repeatable).
        #[arg(long = "sae", value_name = "SAE_ID")]
        saes: Vec<String>,
        /// Do nothing when DIR already holds a CA (for one-shot init containers).
        #[arg(long)]
        keep_existing: bool,
    },
    /// Issue an application (SAE) client certificate with common name NAME (the SAE ID) from
    /// the CA in DIR: writes DIR/NAME.crt and DIR/NAME.key.
    IssueSae {
        /// The SAE ID.
        name: String,
        /// Directory holding ca.crt and ca.key.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
}

/// Runs a `qkdctl pki` subcommand.
pub fn run(cmd: PkiCommand) -> anyhow::Result<()> {
    match cmd {
        PkiCommand::Init { dir, alice_names, bob_names, ca_name, saes, keep_existing } => {
            if keep_existing && dir.join("ca.crt").exists() {
                println!("{} already holds a CA; keeping it", dir.display());
                return Ok(());
            }
            init(&dir, &alice_names, &bob_names, &ca_name)?;
            saes.iter().try_for_each(|sae| issue_sae(&dir, sae))
        }
        PkiCommand::IssueSae { name, dir } => issue_sae(&dir, &name),
    }
}

fn refuse_existing(paths: &[PathBuf]) -> anyhow::Result<()> {
    for path in paths {
        if path.exists() {
            bail!("{} already exists; refusing to overwrite (remove it or choose another --dir)", path.display());
        }
    }
    Ok(())
}

fn init(dir: &Path, alice_names: &[String], bob_names: &[String], ca_name: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files: Vec<PathBuf> =
        ["ca.crt", "ca.key", "alice.crt", "alice.key", "bob.crt", "bob.key"].iter().map(|f| dir.join(f)).collect();
    refuse_existing(&files)?;
    let ca = CertAuthority::generate(ca_name)?;
    for (node, names) in [("alice", alice_names), ("bob", bob_names)] {
        let issued = ca.issue_for(node, names)?;
        write_issued(dir, node, &issued)?;
    }
    // The CA certificate last: its presence means the directory is complete.
    write_pem(&dir.join("ca.key"), ca.key_pem(), true)?;
    write_pem(&dir.join("ca.crt"), ca.cert_pem(), false)?;
    println!("wrote {}/{{ca,alice,bob}}.{{crt,key}} (keys mode 0600)", dir.display());
    println!("alice's certificate names: {}", alice_names.join(", "));
    println!("bob's certificate names:   {}", bob_names.join(", "));
    Ok(())
}

fn issue_sae(dir: &Path, name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.contains('/') {
        bail!("SAE ID {name:?} is not usable as a file name");
    }
    refuse_existing(&[dir.join(format!("{name}.crt")), dir.join(format!("{name}.key"))])?;
    let read =
        |f: &str| std::fs::read_to_string(dir.join(f)).with_context(|| format!("reading {}", dir.join(f).display()));
    let ca = CertAuthority::from_pem(&read("ca.crt")?, &read("ca.key")?).context("loading the CA")?;
    let issued = ca.issue_client(name)?;
    let (cert, key) = write_issued(dir, name, &issued)?;
    println!("wrote {} and {} (SAE ID {name} in the subject CN)", cert.display(), key.display());
    Ok(())
}
