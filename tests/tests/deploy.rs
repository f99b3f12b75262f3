//! The shipped configuration files parse, and a broken one is explained.

use std::path::{Path, PathBuf};

use common::config::{AliceConfig, BobConfig};

fn deploy_files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

/// Every example configuration in deploy/config and deploy/compose parses with the daemon it is
/// for, and the two ends of each pair agree on their post-processing parameters.
#[test]
fn every_shipped_config_parses() {
    for dir in ["deploy/config", "deploy/compose"] {
        let files = deploy_files(dir);
        assert_eq!(files.len(), 2, "{dir} should hold alice.toml and bob.toml");
        let (alice, _) = AliceConfig::load(&files[0]).unwrap_or_else(|e| panic!("{e}"));
        let (bob, _) = BobConfig::load(&files[1]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(alice.protocol, bob.protocol, "{dir}: protocol sections differ");
        assert_eq!(alice.security, bob.security, "{dir}: security sections differ");
        let (a, b) = (alice.kme.expect("alice kme"), bob.kme.expect("bob kme"));
        assert_eq!((a.kme_id.as_str(), a.peer_kme_id.as_str()), (b.peer_kme_id.as_str(), b.kme_id.as_str()));
    }
}

/// A broken configuration gives an error that names the file and the offending key.
#[test]
fn broken_config_names_the_file_and_the_key() {
    let dir = tests::TempDir::new("badcfg");
    let good = std::fs::read_to_string(deploy_files("deploy/config")[0].clone()).unwrap();
    let cases = [
        (good.replace("block_bits = 1000000", "block_bits = 1000000\nblock_size = 5"), "block_size"),
        (good.replace("eps_qkd = 1e-9", "eps_qkd = 2.0"), "eps_qkd"),
        (good.replace("mu_max = 4.0e-3", "mu_max = -1.0"), "mu_max"),
        (good.replace("listen = \"0.0.0.0:7000\"", "listen = \"nowhere\""), "listen"),
        (good.replace("preset = \"wang2026-120km\"", "preset = \"no-such-preset\""), "preset"),
        // The key delivery serves 256-bit units: a smaller unit with [kme] is refused at load,
        // not at the first Get key.
        (good.replace("key_unit_bits = 256", "key_unit_bits = 128"), "key_unit_bits"),
        // No key-encryption key: refused at load, saying how to make one.
        (good.replace("kek_credential = \"qkd-store-kek\"", ""), "kek_file"),
        (good.replace("# kek_file = ", "kek_file = "), "not both"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.0.join(format!("alice-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let err = AliceConfig::load(&path).expect_err(key).to_string();
        assert!(err.contains(&path.display().to_string()), "error does not name the file: {err}");
        assert!(err.contains(key), "error does not name `{key}`: {err}");
    }
}
