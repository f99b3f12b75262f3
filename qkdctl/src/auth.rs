//! `qkdctl auth-secret`: the pre-shared secrets of the Wegman-Carter authentication of the
//! classical channel (docs/security.md, "Authentication").

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use common::auth_pool::{self, Installed, SecretFile};

#[derive(Subcommand, Debug)]
pub enum AuthCommand {
    /// Make a new pre-shared secret (one file, mode 0600): install the same file at both nodes
    /// with `qkdctl auth-secret install`, carried by a secure path, then delete every copy.
    New {
        /// Where to write the secret (refused if it exists).
        #[arg(long)]
        out: PathBuf,
        /// Size in bytes. A block spends 32 bytes (48 with a fresh hash key) and refills 64 from
        /// its key, so a secret only needs to last until the first blocks commit and to carry
        /// the link through runs of failed blocks.
        #[arg(long, default_value_t = auth_pool::DEFAULT_SECRET_BYTES)]
        bytes: usize,
    },
    /// Install a secret made by `qkdctl auth-secret new` at this node. A node with no pool (first
    /// start) gets the secret as its pool. Otherwise the secret is staged, daemon running or not,
    /// and the link applies it at both ends at its next block once both nodes hold it: this is
    /// how a link stopped by an exhausted pool resumes.
    Install {
        /// The node's data directory (`data_dir` of its configuration).
        #[arg(long)]
        data_dir: PathBuf,
        /// The secret file.
        #[arg(long)]
        secret: PathBuf,
        /// Replace the pool by this secret alone (both daemons stopped; do the same at the peer):
        /// for pools that differ ("authentication key pools differ"), e.g. after restoring a
        /// node from a backup.
        #[arg(long)]
        reset: bool,
    },
    /// Lab set-up: one new secret installed at every node whose data directory is given (all on
    /// this machine), written nowhere else; nothing if they all have a pool already.
    Init {
        /// A node's data directory (give each node's).
        #[arg(long = "data-dir", required = true, num_args = 1)]
        data_dirs: Vec<PathBuf>,
    },
    /// The pool of a node: bits left, placeholder or not, secrets applied and staged (works
    /// while the daemon runs).
    Status {
        /// The node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: AuthCommand) -> anyhow::Result<()> {
    match command {
        AuthCommand::New { out, bytes } => new(&out, bytes),
        AuthCommand::Install { data_dir, secret, reset } => install(&data_dir, &secret, reset),
        AuthCommand::Status { data_dir, json } => status(&data_dir, json),
        AuthCommand::Init { data_dirs } => {
            let dirs: Vec<&Path> = data_dirs.iter().map(PathBuf::as_path).collect();
            if auth_pool::init_nodes(&dirs)? {
                println!("one new pre-shared authentication secret installed at {} nodes", dirs.len());
            } else {
                println!("every node has an authentication key pool already; nothing done");
            }
            Ok(())
        }
    }
}

fn new(out: &Path, n_bytes: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        n_bytes >= 64 && n_bytes.is_multiple_of(16),
        "a secret needs a multiple of 16 bytes, at least 64 (one block spends up to 48); {n_bytes} asked"
    );
    let secret = SecretFile::generate(n_bytes);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(out).map_err(|e| anyhow::anyhow!("creating {}: {e}", out.display()))?;
    file.write_all(&secret.encode())
        .and_then(|()| file.sync_all())
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
    println!(
        "wrote secret {} ({n_bytes} random bytes) to {}: install it at Alice and at Bob with `qkdctl auth-secret install \
         --data-dir DIR --secret {}` (carry it by a secure path), then delete every copy",
        secret.id,
        out.display(),
        out.display()
    );
    Ok(())
}

fn install(data_dir: &Path, secret: &Path, reset: bool) -> anyhow::Result<()> {
    let secret = SecretFile::read(secret)?;
    let bits = secret.bytes.len() * 8;
    match auth_pool::install_secret(data_dir, &secret, reset)? {
        Installed::NewPool => println!(
            "secret {} installed as the authentication key pool of {} ({bits} bits); install the same secret at the \
             peer the same way before the link starts",
            secret.id,
            data_dir.display()
        ),
        Installed::Staged => println!(
            "secret {} staged at {} ({bits} bits): the link applies it at both ends at its next block once the peer \
             holds it too (`qkdctl auth-secret status` shows it)",
            secret.id,
            data_dir.display()
        ),
        Installed::AlreadyApplied => println!("secret {} is applied already at {}", secret.id, data_dir.display()),
    }
    Ok(())
}

fn status(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let summary = auth_pool::summary(data_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!(
        "{}: {} unused bits of {} (watermark {}){}",
        data_dir.display(),
        summary.available_bits,
        summary.total_bits,
        summary.watermark,
        if summary.placeholder { "; PUBLIC PLACEHOLDER secret: authenticated by TLS only" } else { "" }
    );
    for applied in &summary.applied {
        println!("  applied secret {} at bit {} ({} bits)", applied.id, applied.position, applied.bits);
    }
    for staged in &summary.staged {
        println!("  staged secret {staged} (applied at the next block once the peer holds it)");
    }
    Ok(())
}
