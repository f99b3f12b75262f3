//! The `[kme]` section of a daemon's configuration, and its validated form.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::identity::{IdentitySource, KmeId, SaeId};
use qkd_tls::TlsFiles;

/// Largest key size this implementation accepts in configuration, bits (256 units of 256 bits).
pub const MAX_SUPPORTED_KEY_SIZE: u32 = 65_536;

/// Largest `max_key_per_request` accepted in configuration.
pub const MAX_SUPPORTED_KEYS_PER_REQUEST: u32 = 4096;

/// Configuration of a KME: the ETSI GS QKD 014 HTTPS server, the KME-to-KME channel, the SAEs
/// it knows and the limits it announces in Get status.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmeConfig {
    /// Socket address of the ETSI HTTPS server that SAEs call, e.g. `0.0.0.0:8443`.
    pub listen: SocketAddr,
    /// TLS of the HTTPS server: `ca_cert` is the CA that signs the SAEs' client certificates
    /// (every connection must present one), `cert` and `key` are this KME's server certificate
    /// and key, which SAEs verify against the KME's host name.
    pub tls: TlsFiles,
    /// Socket address of the KME-to-KME gRPC server (the peer KME's reservations arrive here),
    /// served with the node's TLS material, e.g. `0.0.0.0:50061`.
    pub peer_listen: SocketAddr,
    /// The peer KME's gRPC server, `host:port`.
    pub peer_addr: String,
    /// DNS name the peer's node certificate must be valid for (checked when calling it and
    /// when it calls).
    pub peer_name: String,
    /// This KME's ID (`source_KME_ID` in Get status); unique in the network.
    pub kme_id: String,
    /// The peer KME's ID (`target_KME_ID` in Get status).
    pub peer_kme_id: String,
    /// The SAEs of the network: each attached to this KME or to the peer. Callers not listed
    /// as attached to this KME are refused (401).
    #[serde(default)]
    pub saes: Vec<SaeEntry>,
    /// Where a caller's SAE ID is read in its (CA-verified) client certificate. Default `cn`.
    #[serde(default)]
    pub identity: IdentitySource,
    /// Default key size, bits (`key_size`; a multiple of 8). Default 256.
    #[serde(default = "default_key_size")]
    pub key_size: u32,
    /// Smallest key size served, bits (`min_key_size`; a multiple of 8). Default 64.
    #[serde(default = "default_min_key_size")]
    pub min_key_size: u32,
    /// Largest key size served, bits (`max_key_size`; a multiple of 8, at most 65536).
    /// Default 1024.
    #[serde(default = "default_max_key_size")]
    pub max_key_size: u32,
    /// Most keys in one Get key request (`max_key_per_request`, 1 to 4096). Default 128.
    #[serde(default = "default_max_key_per_request")]
    pub max_key_per_request: u32,
    /// Most keys announced as stored (`max_key_count`): `stored_key_count` is capped at this
    /// number of keys of `key_size`, which also bounds the work of a Get status. Default 100000.
    #[serde(default = "default_max_key_count")]
    pub max_key_count: u64,
    /// Most additional slave SAEs in one Get key request (`max_SAE_ID_count`); 0 disables
    /// multicast. Default 0.
    #[serde(default)]
    pub max_sae_id_count: u32,
    /// Time limit of one call to the peer KME (connection included), milliseconds. Default 5000.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
    /// Reservations whose slaves have not fetched them after this many seconds are erased;
    /// 0 keeps them forever. Default 86400 (one day).
    #[serde(default = "default_reservation_ttl_s")]
    pub reservation_ttl_s: u64,
    /// Serve keys from a simulated quantum channel (the in-process simulator, the device
    /// emulator, a replay of either). Such keys are not secret from whoever runs the
    /// simulation; without this, Get key answers 503 saying so. Default false; the labs set it.
    #[serde(default)]
    pub allow_simulated_keys: bool,
    /// The delivery audit log: one JSON line per delivery (time, SAE IDs, key IDs and sizes,
    /// never key bytes). Deliveries are refused (503) when it cannot be written. Default: the
    /// daemon's `delivery-audit.jsonl` in its data directory.
    #[serde(default)]
    pub audit_log: Option<std::path::PathBuf>,
}

/// One SAE of the network and the KME it is attached to.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaeEntry {
    /// The SAE's ID, as found in its certificate (see [`KmeConfig::identity`]).
    pub sae_id: String,
    /// The ID of the KME it is attached to: `kme_id` or `peer_kme_id`.
    pub kme_id: String,
}

fn default_key_size() -> u32 {
    256
}
fn default_min_key_size() -> u32 {
    64
}
fn default_max_key_size() -> u32 {
    1024
}
fn default_max_key_per_request() -> u32 {
    128
}
fn default_max_key_count() -> u64 {
    100_000
}
fn default_peer_timeout_ms() -> u64 {
    5000
}
fn default_reservation_ttl_s() -> u64 {
    86_400
}

/// A `[kme]` section that does not make sense (the message names the field).
#[derive(Debug, thiserror::Error)]
#[error("kme.{0}")]
pub struct KmeConfigError(pub String);

/// Where an SAE is attached, seen from this KME.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Attached to this KME (it may call this KME).
    Local,
    /// Attached to the peer KME.
    Peer,
}

/// The validated settings of a KME (built once from [`KmeConfig`]).
#[derive(Clone, Debug)]
pub struct KmeSettings {
    /// This KME's ID.
    pub kme_id: KmeId,
    /// The peer KME's ID.
    pub peer_kme_id: KmeId,
    /// Every known SAE and where it is attached.
    pub saes: HashMap<SaeId, Attachment>,
    /// Where the caller's SAE ID is read.
    pub identity: IdentitySource,
    /// Limits announced in Get status.
    pub limits: Limits,
    /// Time limit of one peer call.
    pub peer_timeout: Duration,
    /// Reservation lifetime; `None` keeps reservations forever.
    pub reservation_ttl: Option<Duration>,
    /// Serve keys of a simulated quantum channel.
    pub allow_simulated_keys: bool,
}

/// Key sizes and counts, all validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Default key size, bits.
    pub key_size: u32,
    /// Smallest key size, bits.
    pub min_key_size: u32,
    /// Largest key size, bits.
    pub max_key_size: u32,
    /// Most keys per request.
    pub max_key_per_request: u32,
    /// Cap of `stored_key_count`.
    pub max_key_count: u64,
    /// Most additional slaves per request.
    pub max_sae_id_count: u32,
}

impl Default for Limits {
    /// The defaults of [`KmeConfig`].
    fn default() -> Self {
        Self {
            key_size: default_key_size(),
            min_key_size: default_min_key_size(),
            max_key_size: default_max_key_size(),
            max_key_per_request: default_max_key_per_request(),
            max_key_count: default_max_key_count(),
            max_sae_id_count: 0,
        }
    }
}

impl KmeConfig {
    /// Checks the section and builds the settings the KME runs with.
    pub fn settings(&self) -> Result<KmeSettings, KmeConfigError> {
        let err = |s: String| Err(KmeConfigError(s));
        if self.kme_id.is_empty() || self.peer_kme_id.is_empty() {
            return err("kme_id and peer_kme_id must not be empty".into());
        }
        if self.kme_id == self.peer_kme_id {
            return err(format!("peer_kme_id must differ from kme_id ({:?})", self.kme_id));
        }
        if self.peer_name.is_empty() || self.peer_addr.is_empty() {
            return err("peer_addr and peer_name must not be empty".into());
        }
        let limits = Limits {
            key_size: self.key_size,
            min_key_size: self.min_key_size,
            max_key_size: self.max_key_size,
            max_key_per_request: self.max_key_per_request,
            max_key_count: self.max_key_count,
            max_sae_id_count: self.max_sae_id_count,
        };
        for (name, value) in [
            ("key_size", limits.key_size),
            ("min_key_size", limits.min_key_size),
            ("max_key_size", limits.max_key_size),
        ] {
            if value == 0 || value % 8 != 0 {
                return err(format!("{name} must be a positive multiple of 8 bits, not {value}"));
            }
        }
        if !(limits.min_key_size <= limits.key_size && limits.key_size <= limits.max_key_size) {
            return err("sizes must satisfy min_key_size <= key_size <= max_key_size".into());
        }
        if limits.max_key_size > MAX_SUPPORTED_KEY_SIZE {
            return err(format!("max_key_size must be at most {MAX_SUPPORTED_KEY_SIZE} bits"));
        }
        if limits.max_key_per_request == 0 || limits.max_key_per_request > MAX_SUPPORTED_KEYS_PER_REQUEST {
            return err(format!("max_key_per_request must be between 1 and {MAX_SUPPORTED_KEYS_PER_REQUEST}"));
        }
        if limits.max_key_count == 0 {
            return err("max_key_count must be at least 1".into());
        }
        if limits.max_sae_id_count > 64 {
            return err("max_sae_id_count must be at most 64".into());
        }
        if self.peer_timeout_ms == 0 {
            return err("peer_timeout_ms must be at least 1".into());
        }
        let mut saes = HashMap::new();
        for (i, entry) in self.saes.iter().enumerate() {
            if entry.sae_id.is_empty() || entry.sae_id.len() > 1024 {
                return err(format!("saes[{i}].sae_id must hold 1 to 1024 bytes"));
            }
            let attachment = if entry.kme_id == self.kme_id {
                Attachment::Local
            } else if entry.kme_id == self.peer_kme_id {
                Attachment::Peer
            } else {
                return err(format!("saes[{i}].kme_id {:?} is neither kme_id nor peer_kme_id", entry.kme_id));
            };
            if saes.insert(SaeId(entry.sae_id.clone()), attachment).is_some() {
                return err(format!("saes[{i}].sae_id {:?} is listed twice", entry.sae_id));
            }
        }
        Ok(KmeSettings {
            kme_id: KmeId(self.kme_id.clone()),
            peer_kme_id: KmeId(self.peer_kme_id.clone()),
            saes,
            identity: self.identity,
            limits,
            peer_timeout: Duration::from_millis(self.peer_timeout_ms),
            reservation_ttl: (self.reservation_ttl_s > 0).then(|| Duration::from_secs(self.reservation_ttl_s)),
            allow_simulated_keys: self.allow_simulated_keys,
        })
    }
}

impl KmeSettings {
    /// Where `sae` is attached, if known.
    pub fn attachment(&self, sae: &SaeId) -> Option<Attachment> {
        self.saes.get(sae).copied()
    }
}
